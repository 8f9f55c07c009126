-- pgdurable_async, version 11: what df.start accepts, the worker runs (found by fuzzing,
-- tests/integration/test_fuzz_sql.py).  df.start accepted graphs that then failed at their
-- first turn, or that no worker could even read, leaving the instance pending for ever:
--   * graphs nested deeper than the worker goes: at most 256 nodes (as in pg_durable) and
--     600 JSON levels (df._check, df._check_json via df._node);
--   * numbers beyond a double anywhere in the graph (`1e400`), which the worker's JSON
--     decoder refuses;
--   * sleep / signal timeouts that are not numbers, are NaN or Infinity (df.sleep('NaN')
--     stored the string "NaN"), or are beyond 100 years (a timer must fit in a datetime);
--   * missing or mistyped fields (a sql node without a query, a bind without a node, a seq
--     whose steps are not a list, if_rows with a JSON-null cond, fan_out.as not a name, ...):
--     df._check now makes the field checks of the worker's compiler;
--   * cron expressions that cronsim refuses: a step of 0, a backward range, a name in a
--     field that takes none, or a day no month it names has ('0 0 31 2 *').
SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:df'));  -- `df` is shared by all pgdurable schemas

-- A graph the worker can read back: nested at most 600 JSON levels (a 256-node-deep graph
-- of joins takes 512), no number beyond a double.  Python's compiler has the same limits
-- (MAX_JSON_DEPTH, MAX_DEPTH); its JSON decoder refuses deeper nesting and larger numbers,
-- and an instance it cannot read would fail at its first turn instead of at df.start.
CREATE OR REPLACE FUNCTION df._check_json(graph jsonb) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_path_exists(graph, 'strict $.**{600} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'df: the graph nests more than 600 JSON levels deep (and at most 256 nodes)';
    END IF;
    IF jsonb_path_exists(graph, 'strict $.** ? (@.type() == "number" && (@ > 1.7976931348623157e308 || @ < -1.7976931348623157e308))') THEN
        RAISE EXCEPTION 'df: the graph holds a number beyond the range of double precision';
    END IF;
END $$;

-- The field checks of Python's compiler (pgdurable_async/_graph/compiler.py), so that a graph
-- df.start accepts is one the worker runs.  `f` absent or JSON null counts as missing.
CREATE OR REPLACE FUNCTION df._missing(v jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT v IS NULL OR jsonb_typeof(v) = 'null';
$$;

CREATE OR REPLACE FUNCTION df._check_text(n jsonb, f text, optional boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF optional AND df._missing(n->f) THEN
        RETURN;
    END IF;
    IF jsonb_typeof(n->f) IS DISTINCT FROM 'string' OR n->>f = '' THEN
        RAISE EXCEPTION 'df.start: %.% must be a non-empty string', n->>'type', f;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION df._check_number(n jsonb, f text, optional boolean, minimum numeric, maximum numeric)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF optional AND df._missing(n->f) THEN
        RETURN;
    END IF;
    IF jsonb_typeof(n->f) IS DISTINCT FROM 'number' OR (n->>f)::numeric < minimum
       OR (n->>f)::numeric > coalesce(maximum, (n->>f)::numeric) THEN
        RAISE EXCEPTION 'df.start: %.% must be a number from % to %', n->>'type', f, minimum,
            coalesce(maximum::text, 'any');
    END IF;
END $$;

CREATE OR REPLACE FUNCTION df._check_child(n jsonb, f text) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF df._missing(n->f) THEN
        RAISE EXCEPTION 'df.start: % needs %', n->>'type', f;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION df._check_list(n jsonb, f text) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(n->f) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'df.start: %.% must be a list', n->>'type', f;
    END IF;
    IF jsonb_array_length(n->f) = 0 THEN
        RAISE EXCEPTION 'df.start: a % needs at least one of its %', n->>'type', f;
    END IF;
END $$;

-- Check node `n` at `depth` (the root is 1); returns the names bound after it on every path.
-- Graphs are at most 256 nodes deep, as in pg_durable (and as the recursion here and in the
-- worker can go).
CREATE OR REPLACE FUNCTION df._check(n jsonb, bound text[], depth integer) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := n->>'type';
    child jsonb;
    acc text[];
    refs text[];
    safe boolean[];
BEGIN
    IF jsonb_typeof(n) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'df.start: malformed graph node %', left(coalesce(n::text, 'NULL'), 80);
    END IF;
    IF depth > 256 THEN
        RAISE EXCEPTION 'df.start: the graph is more than 256 nodes deep (the limit is 256)';
    END IF;
    IF jsonb_typeof(n->'type') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'df.start: unknown node type %', coalesce(left((n->'type')::text, 80), 'NULL');
    END IF;
    CASE t
    WHEN 'sql' THEN
        PERFORM df._check_text(n, 'query');
        SELECT array_agg(x.name), array_agg(x.null_safe) INTO refs, safe FROM df._refs(n->>'query') x;
        PERFORM df._check_refs(refs, safe, bound, n->>'query');
        RETURN bound;
    WHEN 'http' THEN
        PERFORM df._check_text(n, 'url');
        IF NOT df._missing(n->'method') AND n->>'method' <> ''
           AND (jsonb_typeof(n->'method') <> 'string'
                OR upper(n->>'method') NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD')) THEN
            RAISE EXCEPTION 'df.start: unsupported HTTP method %', left((n->'method')::text, 80);
        END IF;
        PERFORM df._check_number(n, 'timeout', true, 0, 3162240000);
        IF NOT df._missing(n->'headers') AND jsonb_typeof(n->'headers') <> 'object' THEN
            RAISE EXCEPTION 'df.start: http.headers must be a JSON object';
        END IF;
        SELECT array_agg(m[1]), array_agg(m[4] IS NOT NULL) INTO refs, safe
        FROM regexp_matches(concat_ws(' ', n->>'url', n->>'body', n->>'headers'),
                            '\$([A-Za-z_][A-Za-z0-9_]*)(\.(\*|[A-Za-z_][A-Za-z0-9_]*))?(\?)?', 'g') AS m;
        PERFORM df._check_refs(refs, safe, bound, n->>'url');
        RETURN bound;
    WHEN 'seq' THEN
        PERFORM df._check_list(n, 'steps');
        FOR child IN SELECT value FROM jsonb_array_elements(n->'steps') LOOP
            bound := df._check(child, bound, depth + 1);
        END LOOP;
        RETURN bound;
    WHEN 'join' THEN
        PERFORM df._check_list(n, 'branches');
        acc := bound;
        FOR child IN SELECT value FROM jsonb_array_elements(n->'branches') LOOP
            acc := acc || df._check(child, bound, depth + 1);
        END LOOP;
        RETURN acc;
    WHEN 'race' THEN
        PERFORM df._check_list(n, 'branches');
        FOR child IN SELECT value FROM jsonb_array_elements(n->'branches') LOOP
            acc := df._intersect(acc, df._check(child, bound, depth + 1));
        END LOOP;
        RETURN acc;
    WHEN 'bind' THEN
        PERFORM df._check_text(n, 'name');
        IF n->>'name' !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
            RAISE EXCEPTION 'df.start: bind name % must be an identifier', quote_literal(n->>'name');
        END IF;
        PERFORM df._check_child(n, 'node');
        RETURN df._check(n->'node', bound, depth + 1) || (n->>'name');
    WHEN 'if', 'if_rows' THEN
        PERFORM df._check_child(n, 'then');
        IF t = 'if' THEN
            PERFORM df._check_child(n, 'cond');
        ELSIF df._missing(n->'cond') AND (jsonb_typeof(n->'name') IS DISTINCT FROM 'string'
                                          OR NOT ((n->>'name') = ANY (bound))) THEN
            RAISE EXCEPTION 'df.start: df.if_rows tests %, which is not bound before it',
                coalesce(left((n->'name')::text, 80), 'NULL');
        END IF;
        IF NOT df._missing(n->'cond') THEN
            bound := df._check(n->'cond', bound, depth + 1);
        END IF;
        acc := df._check(n->'then', bound, depth + 1);
        IF NOT df._missing(n->'else') THEN
            acc := df._intersect(acc, df._check(n->'else', bound, depth + 1));
        ELSE
            acc := df._intersect(acc, bound);
        END IF;
        RETURN acc;
    WHEN 'loop' THEN
        PERFORM df._check_child(n, 'body');
        acc := df._check(n->'body', bound, depth + 1);
        IF NOT df._missing(n->'cond') THEN
            PERFORM df._check(n->'cond', acc, depth + 1);
        END IF;
        RETURN bound;
    WHEN 'sleep' THEN
        PERFORM df._check_number(n, 'seconds', false, 0, 3162240000);
        RETURN bound;
    WHEN 'wait_for_schedule' THEN
        PERFORM df._check_text(n, 'cron');
        PERFORM df._check_cron(n->>'cron');
        RETURN bound;
    WHEN 'wait_for_signal' THEN
        PERFORM df._check_text(n, 'name');
        PERFORM df._check_number(n, 'timeout', true, 0, 3162240000);
        RETURN bound || (n->>'name');  -- a signal's result is readable as $<signal name>
    WHEN 'fan_out' THEN  -- Python DSL graphs handed to df.start
        PERFORM df._check_text(n, 'over');
        PERFORM df._check_child(n, 'step');
        PERFORM df._check_number(n, 'limit', true, 1, NULL);
        IF n ? 'as' AND (jsonb_typeof(n->'as') IS DISTINCT FROM 'string' OR n->>'as' !~ '^[A-Za-z_][A-Za-z0-9_]*$') THEN
            RAISE EXCEPTION 'df.start: fan_out.as % must be an identifier', left((n->'as')::text, 80);
        END IF;
        IF NOT ((n->>'over') = ANY (bound)) THEN
            RAISE EXCEPTION 'df.start: fan_out over %, which is not bound before it', quote_literal(n->>'over');
        END IF;
        PERFORM df._check(n->'step', bound || coalesce(n->>'as', 'item'), depth + 1);
        RETURN bound;
    WHEN 'call', 'activity' THEN
        PERFORM df._check_text(n, 'name');
        RETURN bound;
    WHEN 'break' THEN
        RETURN bound;
    ELSE
        RAISE EXCEPTION 'df.start: unknown node type %', quote_literal(t);
    END CASE;
END $$;

-- Check a graph from its root; returns the names bound after it on every path.
CREATE OR REPLACE FUNCTION df._check(n jsonb, bound text[]) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT df._check(n, bound, 1);
$$;

CREATE OR REPLACE FUNCTION df._node(t text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n jsonb;
BEGIN
    IF t IS NULL THEN
        RAISE EXCEPTION 'df: a graph node must not be NULL';
    END IF;
    IF left(ltrim(t), 1) <> '{' THEN
        RETURN jsonb_build_object('type', 'sql', 'query', t);
    END IF;
    BEGIN
        n := t::jsonb;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'df: % is neither SQL nor a graph node', left(t, 80);
    END;
    IF jsonb_typeof(n) <> 'object' OR NOT n ? 'type' THEN
        RAISE EXCEPTION 'df: % is not a graph node', left(t, 80);
    END IF;
    PERFORM df._check_json(n);
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION df.sleep(seconds double precision) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    IF seconds IS NULL OR NOT (seconds >= 0 AND seconds <= 3162240000) THEN  -- NaN is above every number
        RAISE EXCEPTION 'df.sleep: seconds must be from 0 to 3162240000 (100 years), not %', seconds;
    END IF;
    RETURN jsonb_build_object('type', 'sleep', 'seconds', seconds)::text;
END $$;

-- timeout_seconds is an integer in pg_durable; a double here also takes fractions.
CREATE OR REPLACE FUNCTION df.wait_for_signal(name text, timeout_seconds double precision DEFAULT NULL) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'df.wait_for_signal: name must not be empty';
    END IF;
    IF timeout_seconds IS NOT NULL AND NOT (timeout_seconds >= 0 AND timeout_seconds <= 3162240000) THEN
        RAISE EXCEPTION 'df.wait_for_signal: timeout_seconds must be from 0 to 3162240000 (100 years), not %',
            timeout_seconds;
    END IF;
    RETURN jsonb_build_object('type', 'wait_for_signal', 'name', name, 'timeout', timeout_seconds)::text;
END $$;

-- 5-field cron check.  The worker re-checks with cronsim; this accepts no expression cronsim
-- refuses: numbers in range, names only for months (JAN-DEC) and weekdays (SUN-SAT), no
-- backward range, no step 0, and a day of the month that the months allow (cronsim's rule:
-- when day-of-month and day-of-week must both match, a day above 29 must exist in one of
-- the months).
CREATE OR REPLACE FUNCTION df._check_cron(expr text) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    fields text[] := regexp_split_to_array(btrim(coalesce(expr, '')), '\s+');
    lo int[] := ARRAY[0, 0, 1, 1, 0];
    hi int[] := ARRAY[59, 23, 31, 12, 7];
    month_days int[] := ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    part text;
    m text[];
    a int;
    b int;
    step int;
    i int;
    first_day int := 32;
    most_days int := 0;
BEGIN
    IF cardinality(fields) <> 5 THEN
        RAISE EXCEPTION 'bad cron expression %: expected 5 fields (min hour dom month dow)', quote_literal(expr);
    END IF;
    FOR i IN 1..5 LOOP
        FOREACH part IN ARRAY string_to_array(fields[i], ',') LOOP
            m := regexp_match(upper(part), '^(?:(\*)|([0-9]+|[A-Z]{3})(?:-([0-9]+|[A-Z]{3}))?)(?:/([0-9]+))?$');
            IF m IS NULL THEN
                RAISE EXCEPTION 'bad cron expression %: field % (%) is malformed', quote_literal(expr), i, fields[i];
            END IF;
            step := CASE WHEN m[4] IS NULL THEN 1 WHEN length(ltrim(m[4], '0')) > 4 THEN 10000
                         ELSE coalesce(nullif(ltrim(m[4], '0'), '')::int, 0) END;
            IF step = 0 THEN
                RAISE EXCEPTION 'bad cron expression %: a step of 0 in field % (%)', quote_literal(expr), i, fields[i];
            END IF;
            IF m[1] IS NOT NULL THEN
                a := lo[i];
                b := hi[i];
            ELSE
                a := df._cron_value(m[2], i, expr);
                b := CASE WHEN m[3] IS NOT NULL THEN df._cron_value(m[3], i, expr)
                          WHEN m[4] IS NOT NULL THEN hi[i] ELSE a END;
                IF b < a THEN
                    RAISE EXCEPTION 'bad cron expression %: the range % in field % runs backwards',
                        quote_literal(expr), part, i;
                END IF;
            END IF;
            IF i = 3 THEN
                first_day := least(first_day, a);
            ELSIF i = 4 THEN
                SELECT greatest(most_days, max(month_days[k])) INTO most_days FROM generate_series(a, b, step) k;
            END IF;
        END LOOP;
    END LOOP;
    IF first_day > 29 AND (left(fields[3], 1) = '*' OR left(fields[5], 1) = '*') AND first_day > most_days THEN
        RAISE EXCEPTION 'bad cron expression %: no month it names has a day %', quote_literal(expr), first_day;
    END IF;
END $$;

-- One number or name of a cron field (1-based field index i).
CREATE OR REPLACE FUNCTION df._cron_value(v text, i int, expr text) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    lo int[] := ARRAY[0, 0, 1, 1, 0];
    hi int[] := ARRAY[59, 23, 31, 12, 7];
    k int;
BEGIN
    IF v ~ '^[0-9]+$' THEN
        IF length(v) <= 9 AND v::int BETWEEN lo[i] AND hi[i] THEN
            RETURN v::int;
        END IF;
        RAISE EXCEPTION 'bad cron expression %: % is out of range for field % (%-%)',
            quote_literal(expr), v, i, lo[i], hi[i];
    END IF;
    IF i = 4 THEN
        k := array_position(ARRAY['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'], v);
        IF k IS NOT NULL THEN
            RETURN k;
        END IF;
    ELSIF i = 5 THEN
        k := array_position(ARRAY['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'], v);
        IF k IS NOT NULL THEN
            RETURN k - 1;
        END IF;
    END IF;
    RAISE EXCEPTION 'bad cron expression %: % is not a value of field %', quote_literal(expr), v, i;
END $$;
