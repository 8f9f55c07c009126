-- pgdurable_async, version 14: a pg_durable user switches without noticing.
--   * Node states are recorded, not guessed: df.nodes / df.instance_nodes / df.explain read the
--     interpreter's graph_node history facts; node types, configs and results as pg_durable shows
--     them (SQL, THEN, IF, LOOP, SIGNAL {signal_name}, WAIT_SCHEDULE {cron_expr}, ...), a named
--     result on the node itself (df.as sets result_name, as pg_durable does).
--   * df.cancel marks the instance cancelled at once; df.signal and df.cancel reach the worker on a
--     second session (dblink) when one can be opened, so a signal followed by df.await_instance in
--     the same transaction does not wait for a commit; df.start(transaction_mode => 'new') opens
--     that session as the schema owner, so it works for every role.
--   * pg_durable's graph JSON ({"node_type": ...}) is accepted and translated; graphs deeper than
--     256 levels are refused; df.http_multipart; the settings pg_durable reads
--     (pg_durable.list_instances_max_limit, pg_durable.enable_superuser_instances); df.setvar,
--     df.await_instance and 'new' mode refuse to run inside a workflow; df.revoke_usage undoes
--     what the calling admin granted; an instance whose submitting role was dropped stays visible.
--   * df._expire(): pg_durable's retention of finished df instances (window and cap).
SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:df'));  -- `df` is shared by all pgdurable schemas
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

-- ---------------------------------------------------------------------------------------
-- Settings and guards
-- A setting pg_durable defines as a GUC is, without the extension, a placeholder: read with
-- current_setting(name, true), a default when it is unset.
CREATE OR REPLACE FUNCTION df._setting_on(name text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT lower(btrim(coalesce(current_setting(name, true), ''))) IN ('on', 'true', 'yes', '1');
$$;

-- The worker sets df.in_workflow for the transaction that runs a graph's SQL node.
CREATE OR REPLACE FUNCTION df._in_workflow() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('df.in_workflow', true), '') = 'true';
$$;

CREATE OR REPLACE FUNCTION df._refuse_in_workflow(what text) RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION '% cannot be called inside a workflow: call it before df.start() or outside the graph', what
            USING ERRCODE = 'prohibited_sql_statement_attempted';
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------
-- pg_durable's graph JSON on input: {"node_type": "THEN", "left_node": {...}, "right_node": {...},
-- "condition_node": {...}, "extra_nodes": [...], "query": "<SQL or a JSON config>", "result_name": ...}
-- is translated to ours, with pg_durable's validation messages.
CREATE OR REPLACE FUNCTION df._graph_error(path text, message text) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION 'Invalid durable function graph: %: %', path, message USING ERRCODE = 'invalid_parameter_value';
END $$;

-- The deepest node of a pg_durable graph (a walk that stops one level past the limit).
CREATE OR REPLACE FUNCTION df._durofut_depth(n jsonb) RETURNS TABLE (depth int, path text)
LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE w(node, depth, path) AS (
        SELECT n, 0, 'root'::text
        UNION ALL
        SELECT c.child, w.depth + 1, w.path || '.' || c.seg
        FROM w CROSS JOIN LATERAL (
            SELECT w.node->f.field AS child, f.field AS seg
            FROM (VALUES (1, 'left_node'), (2, 'right_node'), (3, 'condition_node')) AS f(ord, field)
            WHERE jsonb_typeof(w.node->f.field) = 'object'
            UNION ALL
            SELECT e.value, 'extra_nodes[' || (e.ord - 1) || ']'
            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(w.node->'extra_nodes') = 'array'
                                           THEN w.node->'extra_nodes' ELSE '[]'::jsonb END) WITH ORDINALITY e(value, ord)
            WHERE jsonb_typeof(e.value) = 'object'
        ) c
        WHERE w.depth <= 256
    )
    SELECT w.depth, w.path FROM w ORDER BY w.depth DESC LIMIT 1;
$$;

CREATE OR REPLACE FUNCTION df._from_durofut(n jsonb, path text DEFAULT 'root') RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text;
    q text;
    cfg jsonb;
    has_cond boolean;
    has_extra boolean;
    l jsonb;
    r jsonb;
    c jsonb;
    e record;
    kids jsonb := '[]';
    out jsonb;
BEGIN
    IF jsonb_typeof(n) IS DISTINCT FROM 'object' THEN
        PERFORM df._graph_error(path, 'Durofut children must be JSON objects');
    END IF;
    IF jsonb_typeof(n->'node_type') IS DISTINCT FROM 'string' THEN
        PERFORM df._graph_error(path, 'node_type must be a string');
    END IF;
    t := n->>'node_type';
    IF t NOT IN ('SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE', 'HTTP',
                 'HTTP_MULTIPART', 'SIGNAL') THEN
        PERFORM df._graph_error(path, format('Unknown node_type %s. Valid types: SQL, THEN, IF, JOIN, LOOP, BREAK, '
                                             'RACE, SLEEP, WAIT_SCHEDULE, HTTP, HTTP_MULTIPART, SIGNAL', quote_literal(t)));
    END IF;
    IF jsonb_typeof(n->'left_node') NOT IN ('object', 'null') OR jsonb_typeof(n->'right_node') NOT IN ('object', 'null') THEN
        PERFORM df._graph_error(path, 'Durofut children must be JSON objects');
    END IF;
    IF jsonb_typeof(n->'condition_node') NOT IN ('object', 'null') THEN
        PERFORM df._graph_error(path, 'condition_node must be a Durofut JSON object');
    END IF;
    IF n ? 'extra_nodes' AND jsonb_typeof(n->'extra_nodes') <> 'null'
       AND (jsonb_typeof(n->'extra_nodes') <> 'array'
            OR EXISTS (SELECT 1 FROM jsonb_array_elements(n->'extra_nodes') x WHERE jsonb_typeof(x) <> 'object')) THEN
        PERFORM df._graph_error(path, 'extra_nodes entries must be Durofut JSON objects');
    END IF;
    IF jsonb_typeof(n->'query') NOT IN ('string', 'null') THEN
        PERFORM df._graph_error(path, 'query must be a string');
    END IF;
    IF jsonb_typeof(n->'result_name') NOT IN ('string', 'null') THEN
        PERFORM df._graph_error(path, 'result_name must be a string');
    END IF;
    has_cond := jsonb_typeof(n->'condition_node') = 'object';
    has_extra := jsonb_typeof(n->'extra_nodes') = 'array' AND jsonb_array_length(n->'extra_nodes') > 0;
    IF has_cond AND t NOT IN ('IF', 'LOOP') THEN
        PERFORM df._graph_error(path, format('condition_node is not valid for %s nodes', t));
    END IF;
    IF has_extra AND t <> 'JOIN' THEN
        PERFORM df._graph_error(path, format('extra_nodes is not valid for %s nodes', t));
    END IF;
    q := n->>'query';
    BEGIN
        cfg := q::jsonb;
    EXCEPTION WHEN others THEN
        cfg := NULL;
    END;
    IF t IN ('IF', 'LOOP') AND jsonb_typeof(cfg) = 'object' AND cfg ? 'condition_node' THEN
        PERFORM df._graph_error(path, format('condition_node in %s must be a first-class Durofut field, not embedded '
                                             'in query', t));
    END IF;
    IF t = 'JOIN' AND jsonb_typeof(cfg) = 'object' AND cfg ? 'extra_nodes' THEN
        PERFORM df._graph_error(path, 'extra_nodes in JOIN must be a first-class Durofut field, not embedded in query');
    END IF;
    IF (has_cond OR has_extra) AND q IS NOT NULL THEN
        IF cfg IS NULL THEN
            PERFORM df._graph_error(path, format('query in %s must be valid JSON config: %s is not JSON', t,
                                                 quote_literal(left(q, 40))));
        ELSIF jsonb_typeof(cfg) <> 'object' THEN
            PERFORM df._graph_error(path, format('query in %s must be a JSON config object', t));
        END IF;
    END IF;
    IF jsonb_typeof(n->'left_node') = 'object' THEN
        l := df._from_durofut(n->'left_node', path || '.left');
    END IF;
    IF jsonb_typeof(n->'right_node') = 'object' THEN
        r := df._from_durofut(n->'right_node', path || '.right');
    END IF;
    IF has_cond THEN
        c := df._from_durofut(n->'condition_node', path || '.condition_node');
    END IF;
    IF t IN ('THEN', 'JOIN', 'RACE', 'LOOP', 'IF') AND l IS NULL THEN
        PERFORM df._graph_error(path, format('%s needs a left_node', t));
    END IF;
    IF t IN ('THEN', 'JOIN', 'RACE') AND r IS NULL AND NOT (t = 'JOIN' AND has_extra) THEN
        PERFORM df._graph_error(path, format('%s needs a right_node', t));
    END IF;
    CASE t
    WHEN 'SQL' THEN
        out := jsonb_build_object('type', 'sql', 'query', q);
    WHEN 'THEN' THEN
        out := jsonb_build_object('type', 'seq', 'steps', df._steps(l) || df._steps(r));
    WHEN 'JOIN', 'RACE' THEN
        kids := jsonb_build_array(l) || CASE WHEN r IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(r) END;
        IF has_extra THEN
            FOR e IN SELECT x.value, x.ord FROM jsonb_array_elements(n->'extra_nodes') WITH ORDINALITY x(value, ord) LOOP
                kids := kids || jsonb_build_array(df._from_durofut(e.value, path || '.extra_nodes[' || (e.ord - 1) || ']'));
            END LOOP;
        END IF;
        out := jsonb_build_object('type', lower(t), 'branches', kids);
    WHEN 'IF' THEN
        IF cfg->>'condition_type' = 'result_has_rows' THEN
            out := jsonb_build_object('type', 'if_rows', 'name', cfg->>'result_name', 'then', l, 'else', r);
            IF c IS NOT NULL THEN
                out := out || jsonb_build_object('cond', c);
            END IF;
        ELSE
            IF c IS NULL THEN
                PERFORM df._graph_error(path, 'IF needs a condition_node');
            END IF;
            out := jsonb_build_object('type', 'if', 'cond', c, 'then', l, 'else', r);
        END IF;
    WHEN 'LOOP' THEN
        out := jsonb_build_object('type', 'loop', 'body', l, 'cond', c, 'continue_on_failure', false);
    WHEN 'BREAK' THEN
        out := df."break"(cfg->>'break_value')::jsonb;
    WHEN 'SLEEP' THEN
        IF q IS NULL OR q !~ '^\s*[0-9]+(\.[0-9]+)?\s*$' THEN
            PERFORM df._graph_error(path, format('Invalid sleep duration: %s', coalesce(q, 'NULL')));
        END IF;
        out := jsonb_build_object('type', 'sleep', 'seconds', btrim(q)::numeric);
    WHEN 'WAIT_SCHEDULE' THEN
        out := jsonb_build_object('type', 'wait_for_schedule', 'cron', btrim(coalesce(cfg->>'cron_expr', '')));
    WHEN 'SIGNAL' THEN
        out := jsonb_build_object('type', 'wait_for_signal', 'name', cfg->>'signal_name',
                                  'timeout', cfg->'timeout_seconds');
    WHEN 'HTTP', 'HTTP_MULTIPART' THEN
        out := jsonb_build_object('type', lower(t), 'url', cfg->>'url', 'method', coalesce(cfg->>'method', 'POST'),
                                  'headers', cfg->'headers', 'timeout', coalesce(cfg->'timeout_seconds', '30'::jsonb))
               || CASE WHEN t = 'HTTP' THEN jsonb_build_object('body', cfg->'body')
                       ELSE jsonb_build_object('parts', cfg->'parts') END;
    END CASE;
    IF jsonb_typeof(n->'result_name') = 'string' THEN
        IF n->>'result_name' !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
            PERFORM df._graph_error(path, format('result name %s is not a valid identifier',
                                                 quote_literal(n->>'result_name')));
        END IF;
        out := out || jsonb_build_object('result_name', n->>'result_name');
    END IF;
    RETURN out;
END $$;

CREATE OR REPLACE FUNCTION df._durofut(n jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    deepest record;
BEGIN
    SELECT * INTO deepest FROM df._durofut_depth(n);
    IF deepest.depth > 256 THEN
        PERFORM df._graph_error(deepest.path, 'Graph exceeds maximum nesting depth of 256. Simplify the workflow '
                                              'or break it into multiple instances.');
    END IF;
    RETURN df._from_durofut(n);
END $$;

-- ---------------------------------------------------------------------------------------
-- Node construction: pg_durable's JSON is translated; a named result sits on the node
-- (result_name), a sequence holding one stays a step of its own.
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
    IF jsonb_typeof(n) = 'object' AND n ? 'node_type' THEN
        RETURN df._durofut(n);
    END IF;
    IF jsonb_typeof(n) <> 'object' OR NOT n ? 'type' THEN
        RAISE EXCEPTION 'df: % is not a graph node', left(t, 80);
    END IF;
    PERFORM df._check_json(n);
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION df._steps(n jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN n->>'type' = 'seq' AND NOT n ? 'result_name' THEN n->'steps' ELSE jsonb_build_array(n) END;
$$;

CREATE OR REPLACE FUNCTION df."as"(fut text, name text) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    x jsonb := df._node(fut);
BEGIN
    IF name = '' THEN
        RAISE EXCEPTION 'df.as: the result name must not be empty';
    END IF;
    IF name !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
        RAISE EXCEPTION 'df.as: result name % is not a valid identifier (letters, digits and _, not starting '
            'with a digit)', quote_literal(name);
    END IF;
    IF df._is_open(x) THEN
        RETURN jsonb_set(x, '{then}', df."as"((x->'then')::text, name)::jsonb)::text;
    END IF;
    IF x ? 'result_name' THEN  -- named twice: both names are bound
        RETURN jsonb_build_object('type', 'bind', 'name', name, 'node', x)::text;
    END IF;
    RETURN (x || jsonb_build_object('result_name', name))::text;
END $$;

-- A multipart/form-data request: parts are {"name", "data_b64", "filename"?, "content_type"?}.
CREATE OR REPLACE FUNCTION df.http_multipart(url text, method text DEFAULT 'POST', parts jsonb DEFAULT NULL,
                                             headers jsonb DEFAULT NULL, timeout_seconds integer DEFAULT 30)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF url IS NULL OR (url !~* '^https?://' AND url !~ '\{[A-Za-z_][A-Za-z0-9_]*\}|^\$[A-Za-z_]') THEN
        RAISE EXCEPTION 'df.http_multipart: % is not an http(s) URL', coalesce(url, 'NULL');
    END IF;
    IF upper(coalesce(method, 'POST')) NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'df.http_multipart: unsupported method % (POST, PUT or PATCH)', method;
    END IF;
    IF timeout_seconds IS NOT NULL AND timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'df.http_multipart: timeout_seconds must be positive';
    END IF;
    IF parts IS NULL THEN
        RAISE EXCEPTION 'df.http_multipart: parts is required';
    END IF;
    IF jsonb_typeof(parts) <> 'array' OR jsonb_array_length(parts) = 0 THEN
        RAISE EXCEPTION 'df.http_multipart: parts must be a non-empty JSON array of part objects';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(parts) p
               WHERE jsonb_typeof(p) <> 'object' OR jsonb_typeof(p->'name') IS DISTINCT FROM 'string'
                  OR jsonb_typeof(p->'data_b64') IS DISTINCT FROM 'string') THEN
        RAISE EXCEPTION 'df.http_multipart: every part needs a "name" and a base64 "data_b64" string';
    END IF;
    RETURN jsonb_build_object('type', 'http_multipart', 'url', url, 'method', upper(coalesce(method, 'POST')),
                              'parts', parts, 'headers', headers, 'timeout', coalesce(timeout_seconds, 30))::text;
END $$;
REVOKE EXECUTE ON FUNCTION df.http_multipart(text, text, jsonb, jsonb, integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------
-- Validation at start
-- Depth as pg_durable counts it: a sequence of n steps is the chain of n - 1 binary `~>` nodes
-- it is written with, so the same graphs are accepted (and refused past 256 levels).
-- (jit is off here and in df._instance_nodes: a recursive query is costed high, and compiling it
-- takes seconds where running it takes milliseconds.)
CREATE OR REPLACE FUNCTION df._check_depth(graph jsonb) RETURNS void LANGUAGE plpgsql IMMUTABLE SET jit TO off AS $$
DECLARE
    deepest record;
BEGIN
    WITH RECURSIVE w(node_id, depth, node) AS (
        SELECT 'n0'::text, 0, graph
        UNION ALL
        SELECT w.node_id || '.' || c.idx, w.depth + c.step, c.child
        FROM w CROSS JOIN LATERAL (
            SELECT (e.ord - 1)::int AS idx, e.value AS child,
                   CASE WHEN w.node->>'type' = 'seq'
                        THEN jsonb_array_length(w.node->'steps') - greatest(e.ord - 1, 1)::int ELSE 1 END AS step
            FROM jsonb_array_elements(CASE WHEN w.node->>'type' = 'seq' AND jsonb_typeof(w.node->'steps') = 'array'
                                           THEN w.node->'steps'
                                           WHEN w.node->>'type' IN ('join', 'race')
                                                AND jsonb_typeof(w.node->'branches') = 'array'
                                           THEN w.node->'branches'
                                           ELSE '[]'::jsonb END) WITH ORDINALITY AS e(value, ord)
            UNION ALL
            SELECT f.idx, w.node->f.field, CASE WHEN f.kind = 'bind' THEN 0 ELSE 1 END
            FROM (VALUES ('bind', 'node', 0), ('if', 'cond', 0), ('if', 'then', 1), ('if', 'else', 2),
                         ('if_rows', 'cond', 0), ('if_rows', 'then', 1), ('if_rows', 'else', 2),
                         ('loop', 'body', 0), ('loop', 'cond', 1), ('fan_out', 'step', 0)) AS f(kind, field, idx)
            WHERE f.kind = w.node->>'type' AND jsonb_typeof(w.node->f.field) = 'object'
        ) c
        WHERE w.depth <= 256
    )
    SELECT w.node_id, w.depth INTO deepest FROM w ORDER BY w.depth DESC LIMIT 1;
    IF deepest.depth > 256 THEN
        PERFORM df._graph_error(deepest.node_id, 'Graph exceeds maximum nesting depth of 256. Simplify the workflow '
                                                 'or break it into multiple instances.');
    END IF;
END $$;

-- A graph as the worker reads it: a JSON string in a node position is a SQL node, nested
-- sequences are one sequence (unless one of them is named), and every node has the fields
-- its type needs (pgdurable_async/_graph/compiler.py normalizes the same way).
CREATE OR REPLACE FUNCTION df._normalize(n jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    f text;
BEGIN
    IF jsonb_typeof(n) = 'string' THEN
        RETURN jsonb_build_object('type', 'sql', 'query', n #>> '{}');
    END IF;
    IF jsonb_typeof(n) IS DISTINCT FROM 'object' THEN
        RETURN n;  -- df._check reports it
    END IF;
    IF n->>'type' = 'seq' AND jsonb_typeof(n->'steps') = 'array' THEN
        n := jsonb_set(n, '{steps}', (SELECT coalesce(jsonb_agg(s.step ORDER BY e.ord, s.ord), '[]')
                                      FROM jsonb_array_elements(n->'steps') WITH ORDINALITY e(value, ord)
                                      CROSS JOIN LATERAL jsonb_array_elements(df._steps(df._normalize(e.value)))
                                           WITH ORDINALITY s(step, ord)));
    ELSIF n->>'type' IN ('join', 'race') AND jsonb_typeof(n->'branches') = 'array' THEN
        n := jsonb_set(n, '{branches}', (SELECT coalesce(jsonb_agg(df._normalize(e.value) ORDER BY e.ord), '[]')
                                         FROM jsonb_array_elements(n->'branches') WITH ORDINALITY e(value, ord)));
    END IF;
    FOREACH f IN ARRAY CASE n->>'type' WHEN 'bind' THEN ARRAY['node'] WHEN 'if' THEN ARRAY['cond', 'then', 'else']
                            WHEN 'if_rows' THEN ARRAY['cond', 'then', 'else'] WHEN 'loop' THEN ARRAY['body', 'cond']
                            WHEN 'fan_out' THEN ARRAY['step'] ELSE ARRAY[]::text[] END LOOP
        IF jsonb_typeof(n->f) IN ('string', 'object') THEN
            n := jsonb_set(n, ARRAY[f], df._normalize(n->f));
        END IF;
    END LOOP;
    RETURN n;
END $$;

-- Check node `n` at `depth` (the root is 1); returns the names bound after it on every path
-- (0011's checks, with pg_durable's http_multipart and result_name, and a loop's body binding
-- what it binds after the loop, as it runs at least once).
CREATE OR REPLACE FUNCTION df._check(n jsonb, bound text[], depth integer) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := n->>'type';
    child jsonb;
    acc text[];
    out text[];
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
        out := bound;
    WHEN 'http', 'http_multipart' THEN
        PERFORM df._check_text(n, 'url');
        IF t = 'http' AND NOT df._missing(n->'method') AND n->>'method' <> ''
           AND (jsonb_typeof(n->'method') <> 'string'
                OR upper(n->>'method') NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD')) THEN
            RAISE EXCEPTION 'df.start: unsupported HTTP method %', left((n->'method')::text, 80);
        END IF;
        IF t = 'http_multipart' AND upper(coalesce(n->>'method', 'POST')) NOT IN ('POST', 'PUT', 'PATCH') THEN
            RAISE EXCEPTION 'df.start: unsupported multipart HTTP method %', quote_literal(n->>'method');
        END IF;
        IF t = 'http_multipart' AND (jsonb_typeof(n->'parts') IS DISTINCT FROM 'array'
                                     OR jsonb_array_length(n->'parts') = 0
                                     OR EXISTS (SELECT 1 FROM jsonb_array_elements(n->'parts') p
                                                WHERE jsonb_typeof(p->'name') IS DISTINCT FROM 'string'
                                                   OR jsonb_typeof(p->'data_b64') IS DISTINCT FROM 'string')) THEN
            RAISE EXCEPTION 'df.start: http_multipart.parts must be a non-empty array of {name, data_b64} objects';
        END IF;
        PERFORM df._check_number(n, 'timeout', true, 0, 3162240000);
        IF NOT df._missing(n->'headers') AND jsonb_typeof(n->'headers') <> 'object' THEN
            RAISE EXCEPTION 'df.start: %.headers must be a JSON object', t;
        END IF;
        SELECT array_agg(m[1]), array_agg(m[4] IS NOT NULL) INTO refs, safe
        FROM regexp_matches(concat_ws(' ', n->>'url', n->>'body', n->>'headers', n->>'parts'),
                            '\$([A-Za-z_][A-Za-z0-9_]*)(\.(\*|[A-Za-z_][A-Za-z0-9_]*))?(\?)?', 'g') AS m;
        PERFORM df._check_refs(refs, safe, bound, n->>'url');
        out := bound;
    WHEN 'seq' THEN
        PERFORM df._check_list(n, 'steps');
        out := bound;
        FOR child IN SELECT value FROM jsonb_array_elements(n->'steps') LOOP
            out := df._check(child, out, depth + 1);
        END LOOP;
    WHEN 'join' THEN
        PERFORM df._check_list(n, 'branches');
        out := bound;
        FOR child IN SELECT value FROM jsonb_array_elements(n->'branches') LOOP
            out := out || df._check(child, bound, depth + 1);
        END LOOP;
    WHEN 'race' THEN
        PERFORM df._check_list(n, 'branches');
        FOR child IN SELECT value FROM jsonb_array_elements(n->'branches') LOOP
            out := df._intersect(out, df._check(child, bound, depth + 1));
        END LOOP;
    WHEN 'bind' THEN
        PERFORM df._check_text(n, 'name');
        IF n->>'name' !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
            RAISE EXCEPTION 'df.start: bind name % must be an identifier', quote_literal(n->>'name');
        END IF;
        PERFORM df._check_child(n, 'node');
        out := df._check(n->'node', bound, depth + 1) || (n->>'name');
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
            out := df._intersect(acc, df._check(n->'else', bound, depth + 1));
        ELSE
            out := df._intersect(acc, bound);
        END IF;
    WHEN 'loop' THEN  -- the body runs at least once: what it binds is bound after the loop
        PERFORM df._check_child(n, 'body');
        out := df._check(n->'body', bound, depth + 1);
        IF NOT df._missing(n->'cond') THEN
            out := df._check(n->'cond', out, depth + 1);
        END IF;
    WHEN 'sleep' THEN
        PERFORM df._check_number(n, 'seconds', false, 0, 3162240000);
        out := bound;
    WHEN 'wait_for_schedule' THEN
        PERFORM df._check_text(n, 'cron');
        PERFORM df._check_cron(n->>'cron');
        out := bound;
    WHEN 'wait_for_signal' THEN
        PERFORM df._check_text(n, 'name');
        PERFORM df._check_number(n, 'timeout', true, 0, 3162240000);
        out := bound || (n->>'name');  -- a signal's result is readable as $<signal name>
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
        out := bound;
    WHEN 'call', 'activity' THEN
        PERFORM df._check_text(n, 'name');
        out := bound;
    WHEN 'break' THEN
        out := bound;
    ELSE
        RAISE EXCEPTION 'df.start: unknown node type %', quote_literal(t);
    END CASE;
    IF n ? 'result_name' THEN  -- a named result sits on its node (pg_durable's |=>)
        IF jsonb_typeof(n->'result_name') IS DISTINCT FROM 'string' OR n->>'result_name' !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
            RAISE EXCEPTION 'df.start: result_name must be an identifier';
        END IF;
        out := out || (n->>'result_name');
    END IF;
    RETURN out;
END $$;

-- Check a graph from its root; returns the names bound after it on every path.
CREATE OR REPLACE FUNCTION df._check(n jsonb, bound text[]) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT df._check(n, bound, 1);
$$;

-- What a graph may hold when a role submits it: HTTP nodes (plain or multipart) only with the
-- df.http grant, activity nodes only with the df.call_activity grant, no built-in names.
CREATE OR REPLACE FUNCTION df._check_policy(graph jsonb, submitter oid) RETURNS void
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
    n jsonb;
BEGIN
    FOR n IN SELECT g.node FROM df._graph_nodes(graph) g LOOP
        IF n->>'type' IN ('call', 'activity') AND (n->>'name') LIKE 'pgdurable.%' THEN
            RAISE EXCEPTION 'df.start: % is a built-in and cannot be called', n->>'name'
                USING ERRCODE = 'insufficient_privilege';
        ELSIF n->>'type' = 'activity'
              AND NOT has_function_privilege(submitter, 'df.call_activity(text, jsonb)', 'EXECUTE') THEN
            RAISE EXCEPTION 'df.start: role % may not run Python activities from a graph '
                '(df.grant_activities(role))', submitter::regrole
                USING ERRCODE = 'insufficient_privilege';
        ELSIF n->>'type' IN ('http', 'http_multipart')
              AND NOT has_function_privilege(submitter, 'df.http(text, text, text, jsonb, integer)', 'EXECUTE') THEN
            RAISE EXCEPTION 'df.start: role % may not use df.http (df.grant_usage(role, include_http => true))',
                submitter::regrole USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------
-- Variables: not from inside a workflow (pg_durable captures them at df.start).
CREATE OR REPLACE FUNCTION df.setvar(name text, value text) RETURNS text LANGUAGE plpgsql STRICT AS $$
#variable_conflict use_column
BEGIN
    PERFORM df._refuse_in_workflow('df.setvar()');
    INSERT INTO df.vars (name, value, owner) VALUES (setvar.name, setvar.value, quote_ident(current_user)::regrole)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value;
    RETURN 'OK';
END $$;

CREATE OR REPLACE FUNCTION df.unsetvar(name text) RETURNS text LANGUAGE plpgsql STRICT AS $$
BEGIN
    PERFORM df._refuse_in_workflow('df.unsetvar()');
    DELETE FROM df.vars v WHERE v.name = unsetvar.name AND v.owner = quote_ident(current_user)::regrole;
    RETURN 'OK';
END $$;

CREATE OR REPLACE FUNCTION df.clearvars() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM df._refuse_in_workflow('df.clearvars()');
    DELETE FROM df.vars v WHERE v.owner = quote_ident(current_user)::regrole;
    RETURN 'OK';
END $$;

-- ---------------------------------------------------------------------------------------
-- A second session.  pg_durable hands signals, cancels and 'new'-mode starts to its background
-- worker over a connection of its own, so they take effect before (and whether or not) the
-- caller's transaction commits.  Without a worker inside the server, the second session is a
-- dblink connection opened by the definer trigger below, as the schema owner: no password is
-- needed when the owner is a superuser; otherwise create a loopback server with a user mapping
-- for the owner (CREATE SERVER pgdurable_loopback FOREIGN DATA WRAPPER dblink_fdw OPTIONS
-- (dbname '...'); CREATE USER MAPPING FOR <owner> SERVER pgdurable_loopback OPTIONS (user '<owner>',
-- password '...')), which is used when it exists.  Returns the statement's one text value, or
-- NULL when no second session can be opened (then signals and cancels take effect at commit).
CREATE OR REPLACE FUNCTION df._remote(statement text, required boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    ext text;
    host text;
    conn text;
    value text;
BEGIN
    SELECT n.nspname INTO ext FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'dblink';
    IF ext IS NULL THEN
        IF required THEN
            RAISE EXCEPTION 'df.start(transaction_mode => ''new'') needs the dblink extension: CREATE EXTENSION dblink'
                USING ERRCODE = 'feature_not_supported';
        END IF;
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = 'pgdurable_loopback') THEN
        conn := 'pgdurable_loopback';
    ELSE
        host := coalesce(host(inet_server_addr()),
                         nullif(btrim(split_part(current_setting('unix_socket_directories'), ',', 1)), ''));
        conn := format('dbname=%s user=%s port=%s application_name=pgdurable_df', df._conninfo(current_database()),
                       df._conninfo(current_user), current_setting('port'))
                || CASE WHEN host IS NULL THEN '' ELSE ' host=' || df._conninfo(host) END;
    END IF;
    BEGIN
        EXECUTE format('SELECT t.v FROM %I.dblink($1, $2) AS t(v text)', ext) INTO value USING conn, statement;
    EXCEPTION WHEN others THEN
        IF required THEN
            RAISE EXCEPTION 'df.start(transaction_mode => ''new'') could not open its second session: %', SQLERRM
                USING HINT = 'the schema owner must be able to connect without a password (a superuser can), or '
                             'create the foreign server pgdurable_loopback with a user mapping for it';
        END IF;
        RETURN NULL;
    END;
    RETURN value;
END $$;
REVOKE ALL ON FUNCTION df._remote(text, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION df._conninfo(value text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT '''' || replace(replace(value, '\', '\\'), '''', '\''') || '''';
$$;

-- A graph instance (id given, or a random free 8-hex id), submitted by `submitter`.  Only the
-- definer code of this schema calls it: it trusts `submitter`.
CREATE OR REPLACE FUNCTION df._create_instance(doc jsonb, id text, submitter oid) RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF id IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM create_instances(ARRAY[id], ARRAY['pgdurable.graph'], ARRAY[doc],
                                                      ARRAY[NULL::text], ARRAY[NULL::integer], ARRAY[NULL::integer])) THEN
            RAISE EXCEPTION 'df.start: instance % already exists', id USING ERRCODE = 'unique_violation';
        END IF;
    ELSE
        LOOP
            id := lpad(to_hex((random() * 4294967295)::bigint), 8, '0');
            EXIT WHEN EXISTS (SELECT 1 FROM create_instances(ARRAY[id], ARRAY['pgdurable.graph'], ARRAY[doc],
                                                             ARRAY[NULL::text], ARRAY[NULL::integer],
                                                             ARRAY[NULL::integer]));
        END LOOP;
    END IF;
    UPDATE instances SET submitted_by = submitter WHERE instance_id = id;
    RETURN id;
END $$;
REVOKE ALL ON FUNCTION df._create_instance(jsonb, text, oid) FROM PUBLIC;

-- Runs as the schema owner, after the caller's column defaults; the row-level security check on
-- requested_by follows it, so nothing here leaves the caller's transaction (df._request_done,
-- which runs after that check, may).
CREATE OR REPLACE FUNCTION df._request_accept() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    sub oid;
BEGIN
    IF NEW.kind = 'start' THEN
        IF octet_length(NEW.graph::text) > 4194304 THEN  -- the worker's payload limit (max_payload_bytes)
            RAISE EXCEPTION 'df.start: the graph is too large (% bytes; the limit is 4 MiB)',
                octet_length(NEW.graph::text) USING ERRCODE = 'program_limit_exceeded';
        END IF;
        PERFORM df._check_depth(NEW.graph);
        NEW.graph := df._normalize(NEW.graph);
        PERFORM df._check(NEW.graph, ARRAY[]::text[]);
        PERFORM df._check_policy(NEW.graph, NEW.requested_by);
        IF EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = NEW.requested_by AND r.rolsuper)
           AND NOT df._setting_on('pg_durable.enable_superuser_instances') THEN
            RAISE EXCEPTION 'df.start: role % is a superuser, and superuser instances are disabled',
                NEW.requested_by::regrole USING ERRCODE = 'insufficient_privilege',
                HINT = 'start graphs as an ordinary role, or set pg_durable.enable_superuser_instances = on';
        END IF;
        IF NEW.payload->>'transaction_mode' = 'new' THEN  -- created by df._request_done on a second session
            IF NEW.instance_id IS NULL THEN
                LOOP
                    NEW.instance_id := lpad(to_hex((random() * 4294967295)::bigint), 8, '0');
                    EXIT WHEN NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = NEW.instance_id);
                END LOOP;
            END IF;
            RETURN NEW;
        END IF;
        NEW.instance_id := df._create_instance(df._start_doc(NEW), NEW.instance_id, NEW.requested_by);
    ELSE
        SELECT i.submitted_by INTO sub FROM instances i
        WHERE i.instance_id = NEW.instance_id AND i.name = 'pgdurable.graph';
        IF sub IS NULL OR NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = sub)
           OR NOT pg_has_role(NEW.requested_by, sub, 'MEMBER') THEN
            RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id USING ERRCODE = 'no_data_found';
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION df._start_doc(r df._requests) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('graph', r.graph, 'vars', coalesce(r.vars, '{}'), 'search_path', r.search_path,
                              'label', r.label);
$$;

-- After the row-level security check: 'new'-mode starts are created, and signals and cancels
-- delivered, on a second session when one can be opened (else with this transaction).  A cancel also marks
-- the instance cancelled here and now, as pg_durable does; the engine never overwrites that.
CREATE OR REPLACE FUNCTION df._request_done() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.kind = 'start' AND NEW.payload->>'transaction_mode' = 'new' THEN
        PERFORM df._remote(format('SELECT df._create_instance(%L::jsonb, %L, %s::oid)', df._start_doc(NEW),
                                  NEW.instance_id, NEW.requested_by), true);
    ELSIF NEW.kind IN ('event_received', 'cancel_requested') THEN
        -- (an instance this transaction created is not visible there: send() fails, and it goes locally)
        IF df._remote(format('SELECT ''sent'' FROM %I.send(%L, %L, %L::jsonb)', current_schema(),
                                     NEW.instance_id, NEW.kind, NEW.payload)) IS NULL THEN
            PERFORM send(NEW.instance_id, NEW.kind, NEW.payload);
        END IF;
        IF NEW.kind = 'cancel_requested' THEN
            UPDATE instances
            SET status = 'cancelled', updated_at = now(),
                error = jsonb_build_object('type', 'Cancelled', 'message', 'cancelled', 'reason', NEW.payload->'reason')
            WHERE instance_id = NEW.instance_id AND NOT is_finished(status);
            PERFORM pg_notify(current_schema() || '_orch', '');  -- after the commit: a turn can lock it again
        END IF;
    END IF;
    DELETE FROM df._requests WHERE id = NEW.id;
    RETURN NULL;
END $$;

DROP FUNCTION IF EXISTS df._submit(jsonb, text, text, jsonb, text);
CREATE OR REPLACE FUNCTION df._submit(graph jsonb, label text DEFAULT NULL, search_path text DEFAULT NULL,
                                      vars jsonb DEFAULT NULL, instance_id text DEFAULT NULL,
                                      transaction_mode text DEFAULT 'caller') RETURNS text
LANGUAGE sql VOLATILE AS $$
    INSERT INTO df._requests (kind, graph, label, search_path, vars, instance_id, payload)
    VALUES ('start', graph, label, search_path, vars, instance_id,
            CASE WHEN transaction_mode = 'new' THEN '{"transaction_mode": "new"}'::jsonb END)
    RETURNING instance_id;
$$;

DROP FUNCTION IF EXISTS df._start_new(text, text);

CREATE OR REPLACE FUNCTION df.start(fut text, label text DEFAULT NULL, database text DEFAULT NULL,
                                    transaction_mode text DEFAULT 'caller') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    mode text := lower(btrim(coalesce(transaction_mode, 'caller')));
    graph jsonb;
BEGIN
    IF mode NOT IN ('caller', 'new') THEN
        RAISE EXCEPTION 'invalid transaction_mode "%" for df.start(): use ''caller'' (the default) or ''new''',
            transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode = 'new' THEN
        PERFORM df._refuse_in_workflow('df.start(transaction_mode => ''new'')');
    END IF;
    graph := df._node(fut);
    IF database IS NOT NULL AND database <> current_database() THEN
        RAISE EXCEPTION 'df.start: database % is not this database (%); start it there', database, current_database();
    END IF;
    RETURN df._submit(graph, label, current_setting('search_path'),
                      (SELECT jsonb_object_agg(v.name, v.value) FROM df.vars v
                       WHERE v.owner = quote_ident(current_user)::regrole),
                      NULL, mode);
END $$;

CREATE OR REPLACE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user') RETURNS text
LANGUAGE plpgsql STRICT AS $$
BEGIN
    PERFORM df._request('cancel_requested', instance_id, jsonb_build_object('reason', reason));
    RETURN format('Instance %s cancelled: %s', instance_id, reason);
END $$;

-- ---------------------------------------------------------------------------------------
-- Monitoring.  An instance whose submitting role was dropped stays listed (its submitted_by shows
-- the role's number), visible to superusers.
CREATE OR REPLACE VIEW df.instances WITH (security_barrier) AS
SELECT i.instance_id::varchar(8)                       AS id,
       i.input->>'label'                               AS label,
       'n0'::varchar(8)                                AS root_node,
       i.status,
       i.submitted_by::regrole                         AS submitted_by,
       current_database()::text COLLATE "default"      AS database,
       i.created_at,
       i.updated_at,
       CASE WHEN i.status = 'completed' THEN i.updated_at END AS completed_at,
       i.name                                          AS function_name,
       i.execution_id::bigint                          AS execution_count,
       i.output,
       i.error
FROM instances i
LEFT JOIN pg_roles r ON r.oid = i.submitted_by
WHERE i.name = 'pgdurable.graph' AND i.parent_instance_id IS NULL AND i.submitted_by IS NOT NULL
  AND CASE WHEN r.oid IS NULL THEN EXISTS (SELECT 1 FROM pg_roles s WHERE s.rolname = current_user AND s.rolsuper)
           ELSE pg_has_role(current_user, r.oid, 'MEMBER') END;

-- What the monitoring functions show as an instance's output: its result, or its error message.
CREATE OR REPLACE FUNCTION df._output(status text, output jsonb, error jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN status = 'failed' THEN coalesce(error->>'message', error::text) ELSE output::text END;
$$;

CREATE OR REPLACE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.id::text, i.label, i.function_name, '1.0.0'::text, i.execution_count, i.status,
           df._output(i.status, i.output, i.error)
    FROM df.instances i WHERE i.id = instance_info.instance_id;
$$;

-- pg_durable's page-size guard: its pg_durable.list_instances_max_limit setting (default 1000).
CREATE OR REPLACE FUNCTION df._check_limit(limit_count integer) RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    setting text := btrim(coalesce(current_setting('pg_durable.list_instances_max_limit', true), ''));
    cap integer := CASE WHEN setting ~ '^[0-9]{1,9}$' THEN setting::integer ELSE 1000 END;
BEGIN
    IF limit_count IS NULL OR limit_count < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1';
    END IF;
    IF limit_count > cap THEN
        RAISE EXCEPTION 'df.list_instances: limit_count (%) exceeds pg_durable.list_instances_max_limit (%); '
            'request fewer rows, or use the paginated df.list_instances overload (after_cursor/next_cursor) '
            'for large result sets', limit_count, cap;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION df.list_instances(status_filter text DEFAULT NULL, limit_count integer DEFAULT 100)
RETURNS TABLE (instance_id text, label text, function_name text, status text, execution_count bigint, output text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM df._check_limit(limit_count);
    RETURN QUERY
    SELECT i.id::text, i.label, i.function_name, i.status, i.execution_count, df._output(i.status, i.output, i.error)
    FROM df.instances i
    WHERE status_filter IS NULL OR i.status = status_filter
    ORDER BY i.created_at DESC, i.id
    LIMIT limit_count;
END $$;

CREATE OR REPLACE FUNCTION df.list_instances(status_filter text, limit_count integer, label_filter text,
                                             after_cursor text DEFAULT NULL)
RETURNS TABLE (instance_id text, label text, function_name text, status text, execution_count bigint,
               output text, created_at timestamptz, completed_at timestamptz, next_cursor text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    after_at timestamptz;
    after_id text;
BEGIN
    PERFORM df._check_limit(limit_count);
    IF after_cursor IS NOT NULL THEN
        BEGIN
            after_at := split_part(convert_from(decode(after_cursor, 'hex'), 'UTF8'), '|', 1)::timestamptz;
            after_id := split_part(convert_from(decode(after_cursor, 'hex'), 'UTF8'), '|', 2);
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION 'df.list_instances: malformed after_cursor';
        END;
    END IF;
    RETURN QUERY
    WITH page AS (
        SELECT i.* FROM df.instances i
        WHERE (status_filter IS NULL OR i.status = status_filter)
          AND (label_filter IS NULL OR i.label = label_filter)
          AND (after_at IS NULL OR i.created_at < after_at OR (i.created_at = after_at AND i.id > after_id))
        ORDER BY i.created_at DESC, i.id
        LIMIT limit_count + 1
    ), numbered AS (
        SELECT p.*, row_number() OVER (ORDER BY p.created_at DESC, p.id) AS n, count(*) OVER () AS total FROM page p
    )
    SELECT x.id::text, x.label, x.function_name, x.status, x.execution_count, df._output(x.status, x.output, x.error),
           x.created_at, x.completed_at,
           (SELECT CASE WHEN x.total > limit_count
                        THEN encode(convert_to(l.created_at::text || '|' || l.id, 'UTF8'), 'hex') END
            FROM numbered l WHERE l.n = limit_count)
    FROM numbered x WHERE x.n <= limit_count
    ORDER BY x.n;
END $$;

-- Polls (inside SQL a LISTEN cannot be consumed); needs READ COMMITTED to see progress.
-- Refused inside a workflow: it would hold a worker's session (or wait for itself).
CREATE OR REPLACE FUNCTION df.await_instance(instance_id text, timeout_seconds double precision DEFAULT 30)
RETURNS text LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    deadline timestamptz;
    st text;
    pause double precision := 0.02;
BEGIN
    PERFORM df._refuse_in_workflow('df.await_instance()');
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'df.await_instance: timeout_seconds must be > 0';
    END IF;
    deadline := clock_timestamp() + make_interval(secs => timeout_seconds);
    LOOP
        SELECT i.status INTO st FROM df.instances i WHERE i.id = await_instance.instance_id;
        IF st IS NULL THEN
            RAISE EXCEPTION 'Instance not found: %', instance_id USING ERRCODE = 'no_data_found';
        END IF;
        IF st IN ('completed', 'failed', 'cancelled', 'terminated') THEN
            RETURN st;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'df.await_instance: instance % is still % after % s', instance_id, st, timeout_seconds
                USING ERRCODE = 'query_canceled';
        END IF;
        PERFORM pg_sleep(least(pause, greatest(extract(epoch FROM deadline - clock_timestamp()), 0)));
        pause := least(pause * 1.5, 0.5);
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------
-- Node states: read from the graph_node facts the interpreter records (every execution's), a
-- SQL or HTTP node of a history older than those facts from its activity's events.  Then, as
-- pg_durable infers them, top down: a node that finished in the current iteration of every loop
-- around it keeps its state; an unfinished node under such a finished ancestor was left behind
-- (`skipped`), as is every unfinished node once the instance has finished; a node whose facts
-- predate the latest iteration of a loop around it reads `pending` (it runs again).
-- Node types and configs are pg_durable's: THEN for a sequence, IF with {"condition_node"},
-- LOOP, SLEEP "<seconds>", WAIT_SCHEDULE {"cron_expr"}, SIGNAL {"signal_name", "timeout_seconds"}.
CREATE OR REPLACE FUNCTION df._node_type(n jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE n->>'type' WHEN 'seq' THEN 'THEN' WHEN 'if_rows' THEN 'IF' WHEN 'wait_for_schedule' THEN 'WAIT_SCHEDULE'
                           WHEN 'wait_for_signal' THEN 'SIGNAL' ELSE upper(n->>'type') END;
$$;

CREATE OR REPLACE FUNCTION df._seconds(v jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' AND (v::text)::numeric = trunc((v::text)::numeric)
                THEN trunc((v::text)::numeric)::text ELSE v #>> '{}' END;
$$;

CREATE OR REPLACE FUNCTION df._node_config(n jsonb, node_id text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE n->>'type'
        WHEN 'sql' THEN n->>'query'
        WHEN 'sleep' THEN df._seconds(n->'seconds')
        WHEN 'wait_for_schedule' THEN jsonb_build_object('cron_expr', n->>'cron')::text
        WHEN 'wait_for_signal' THEN jsonb_build_object('signal_name', n->>'name', 'timeout_seconds', n->'timeout')::text
        WHEN 'http' THEN jsonb_build_object('url', n->>'url', 'method', n->>'method', 'body', n->'body',
                                            'headers', n->'headers', 'timeout_seconds', n->'timeout')::text
        WHEN 'http_multipart' THEN jsonb_build_object('url', n->>'url', 'method', n->>'method', 'parts', n->'parts',
                                                      'headers', n->'headers', 'timeout_seconds', n->'timeout')::text
        WHEN 'break' THEN jsonb_build_object('break_value', n->'value')::text
        WHEN 'if' THEN jsonb_build_object('condition_node', node_id || '.0')::text
        WHEN 'if_rows' THEN (jsonb_build_object('condition_type', 'result_has_rows', 'result_name', n->>'name')
                             || CASE WHEN jsonb_typeof(n->'cond') = 'object'
                                     THEN jsonb_build_object('condition_node', node_id || '.0')
                                     ELSE '{}'::jsonb END)::text
        WHEN 'loop' THEN CASE WHEN jsonb_typeof(n->'cond') = 'object'
                              THEN jsonb_build_object('condition_node', node_id || '.1')::text END
        WHEN 'join' THEN CASE WHEN jsonb_array_length(n->'branches') > 2
                              THEN jsonb_build_object('extra_nodes', (SELECT jsonb_agg(node_id || '.' || k)
                                  FROM generate_series(2, jsonb_array_length(n->'branches') - 1) k))::text END
        WHEN 'seq' THEN CASE WHEN jsonb_array_length(n->'steps') > 2
                             THEN jsonb_build_object('steps', (SELECT jsonb_agg(node_id || '.' || k)
                                 FROM generate_series(0, jsonb_array_length(n->'steps') - 1) k))::text END
        WHEN 'call' THEN jsonb_build_object('name', n->>'name', 'input', n->'input')::text
        WHEN 'activity' THEN jsonb_build_object('name', n->>'name', 'input', n->'input')::text
        WHEN 'fan_out' THEN jsonb_build_object('over', n->>'over', 'as', n->>'as', 'limit', n->'limit')::text
    END;
$$;

-- The instance row behind df.instance_nodes and df.explain: a graph instance the session's user
-- may act for (a superuser sees those whose submitting role was dropped too).
CREATE OR REPLACE FUNCTION df._visible(instance_id text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT EXISTS (
        SELECT 1 FROM instances i LEFT JOIN pg_roles ro ON ro.oid = i.submitted_by
        WHERE i.instance_id = _visible.instance_id AND i.name = 'pgdurable.graph' AND i.submitted_by IS NOT NULL
          AND CASE WHEN ro.oid IS NULL
                   THEN EXISTS (SELECT 1 FROM pg_roles s WHERE s.rolname = session_user AND s.rolsuper)
                   ELSE pg_has_role(session_user, ro.oid, 'MEMBER') END);
$$;

CREATE OR REPLACE FUNCTION df._instance_graph(instance_id text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT i.input->'graph' FROM instances i
    WHERE i.instance_id = _instance_graph.instance_id AND df._visible(i.instance_id);
$$;

CREATE OR REPLACE FUNCTION df._instance_nodes(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text, right_node text,
               status text, result text, status_details text, inferred_status text,
               inferred_status_from_ancestor_id text, updated_at timestamptz, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT SET jit TO off AS $$
#variable_conflict use_column
DECLARE
    inst record;
    finished boolean;
    spine text[];
BEGIN
    SELECT i.* INTO inst FROM instances i WHERE i.instance_id = instance_id_param AND df._visible(i.instance_id);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'df.instance_nodes: instance % not found', instance_id_param
            USING ERRCODE = 'no_data_found';
    END IF;
    finished := is_finished(inst.status);
    -- loops that continue as new (the root, or a step of a root sequence) are stamped <id>::<execution>,
    -- any other loop as pg_durable stamps the child instance it runs a loop in
    spine := ARRAY['n0'] || CASE WHEN inst.input->'graph'->>'type' = 'seq' AND NOT inst.input->'graph' ? 'result_name'
                                 THEN ARRAY(SELECT 'n0.' || (k - 1) FROM generate_series(1,
                                            jsonb_array_length(inst.input->'graph'->'steps')) k)
                                 ELSE ARRAY[]::text[] END;
    RETURN QUERY
    WITH RECURSIVE g AS (
        SELECT * FROM df._graph_nodes(inst.input->'graph')
    ), facts AS (
        SELECT DISTINCT ON (h.payload->>'node') h.payload->>'node' AS node_id, h.payload AS fact,
               h.execution_id, h.recorded_at, (h.execution_id::bigint << 32) + h.seq AS at
        FROM history h
        WHERE h.instance_id = inst.instance_id AND h.event_type = 'graph_node'
        ORDER BY h.payload->>'node', h.execution_id DESC, h.seq DESC
    ), iterations AS (
        SELECT h.payload->>'node' AS node_id, max((h.execution_id::bigint << 32) + h.seq) AS at
        FROM history h
        WHERE h.instance_id = inst.instance_id AND h.event_type = 'graph_node' AND h.payload ? 'iteration'
        GROUP BY h.payload->>'node'
    ), acts AS (  -- a history recorded before node facts existed
        SELECT DISTINCT ON (s.payload->'input'->>'node') s.payload->'input'->>'node' AS node_id,
               jsonb_strip_nulls(jsonb_build_object(
                   'state', CASE d.event_type WHEN 'activity_completed' THEN 'completed'
                                              WHEN 'activity_failed' THEN 'failed' ELSE 'running' END,
                   'result', CASE jsonb_typeof(d.payload->'result')
                                  WHEN 'object' THEN (d.payload->'result') - '_pgdurable_columns'
                                  ELSE d.payload->'result' END,
                   'error', coalesce(d.payload->'error'->>'message', d.payload->>'error'))) AS fact,
               s.execution_id, coalesce(d.recorded_at, s.recorded_at) AS recorded_at,
               (s.execution_id::bigint << 32) + coalesce(d.seq, s.seq) AS at
        FROM history s
        LEFT JOIN history d ON d.instance_id = s.instance_id AND d.execution_id = s.execution_id
             AND d.event_type IN ('activity_completed', 'activity_failed') AND d.payload->'task_id' = s.payload->'task_id'
        WHERE s.instance_id = inst.instance_id AND s.event_type = 'activity_scheduled' AND s.payload->'input' ? 'node'
          AND NOT EXISTS (SELECT 1 FROM facts)
        ORDER BY s.payload->'input'->>'node', s.execution_id DESC, s.seq DESC
    ), known AS (
        SELECT * FROM facts UNION ALL SELECT * FROM acts
    ), phys AS (
        SELECT g.node_id, g.parent_id, g.pos, g.node, k.fact, k.execution_id, k.recorded_at, k.at,
               coalesce(k.fact->>'state', 'pending') AS state
        FROM g LEFT JOIN known k ON k.node_id = g.node_id
    ), walk AS (
        SELECT p.node_id, NULL::text AS decided_from, NULL::bigint AS loop_at, NULL::text AS loop_id,
               false AS superseded, p.state IN ('completed', 'failed') AS terminal
        FROM phys p WHERE p.parent_id IS NULL
        UNION ALL
        SELECT c.node_id,
               CASE WHEN w.terminal AND NOT w.superseded THEN w.node_id ELSE w.decided_from END,
               x.loop_at, x.loop_id,
               coalesce(c.at < x.loop_at, false),
               c.state IN ('completed', 'failed')
        FROM walk w
        JOIN phys c ON c.parent_id = w.node_id
        CROSS JOIN LATERAL (
            SELECT CASE WHEN it.at IS NOT NULL AND (w.loop_at IS NULL OR it.at > w.loop_at) THEN it.at
                        ELSE w.loop_at END AS loop_at,
                   CASE WHEN it.at IS NOT NULL AND (w.loop_at IS NULL OR it.at > w.loop_at) THEN w.node_id
                        ELSE w.loop_id END AS loop_id
            FROM (SELECT max(i.at) AS at FROM iterations i WHERE i.node_id = w.node_id) it
        ) x
    )
    SELECT p.node_id,
           df._node_type(p.node),
           df._node_config(p.node, p.node_id),
           CASE WHEN p.node->>'type' = 'bind' THEN p.node->>'name' ELSE p.node->>'result_name' END,
           (SELECT min(c.node_id) FROM g c WHERE c.parent_id = p.node_id
                AND c.pos = CASE p.node->>'type' WHEN 'if' THEN 1 WHEN 'if_rows' THEN 1 ELSE 0 END),
           (SELECT min(c.node_id) FROM g c WHERE c.parent_id = p.node_id
                AND c.pos = CASE p.node->>'type' WHEN 'if' THEN 2 WHEN 'if_rows' THEN 2 WHEN 'loop' THEN -1 ELSE 1 END),
           p.state,
           CASE p.state WHEN 'completed' THEN (p.fact->'result')::text
                        WHEN 'failed' THEN to_jsonb(coalesce(p.fact->>'error', 'failed'))::text END,
           CASE WHEN p.execution_id IS NULL THEN NULL
                WHEN p.node->>'type' = 'loop' AND NOT p.node_id = ANY (spine)
                THEN jsonb_build_object('execution_id', inst.instance_id || '::' || p.execution_id || '::'
                                                        || left(md5(p.node_id), 8) || '::1')::text
                ELSE jsonb_build_object('execution_id', inst.instance_id || '::' || p.execution_id)::text END,
           CASE WHEN w.terminal AND NOT w.superseded THEN p.state
                WHEN w.decided_from IS NOT NULL OR finished THEN 'skipped'
                WHEN w.superseded THEN 'pending'
                WHEN p.state = 'running' THEN 'running'
                ELSE 'pending' END,
           CASE WHEN w.terminal AND NOT w.superseded THEN NULL
                WHEN w.decided_from IS NOT NULL THEN w.decided_from
                WHEN finished THEN CASE WHEN p.node_id <> 'n0' THEN 'n0' END
                WHEN w.superseded THEN w.loop_id END,
           coalesce(p.recorded_at, inst.created_at),
           p.fact->>'error'
    FROM phys p JOIN walk w ON w.node_id = p.node_id
    ORDER BY p.node_id;
END $$;

-- ---------------------------------------------------------------------------------------
-- df.explain in pg_durable's format: `SQL: <query>`, `SLEEP 30s`, a sequence as one `→` line per
-- step, `║ branch N:` for the branches of a JOIN or RACE, `? condition:` / `✓ then:` / `✗ else:`,
-- `↻ body:` / `? while:`; for an instance a header and a marker per node (✓ ✗ ⏳ ○ ⊘).
CREATE OR REPLACE FUNCTION df._explain_short(s text, width integer) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN length(x) > width THEN left(x, width - 3) || '...' ELSE x END
    FROM (SELECT btrim(regexp_replace(coalesce(s, ''), '\s+', ' ', 'g')) AS x) t;
$$;

CREATE OR REPLACE FUNCTION df._explain_label(n jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN n->>'type' = 'sql'
                THEN 'SQL' || coalesce(' |=> ' || quote_literal(n->>'result_name'), '') || ': '
                     || df._explain_short(n->>'query', 50)
                ELSE CASE n->>'type'
                     WHEN 'seq' THEN 'THEN'
                     WHEN 'join' THEN 'JOIN (' || jsonb_array_length(n->'branches') || ')'
                     WHEN 'race' THEN 'RACE (' || jsonb_array_length(n->'branches') || ')'
                     WHEN 'if' THEN 'IF'
                     WHEN 'if_rows' THEN 'IF rows of $' || coalesce(n->>'name', '?')
                     WHEN 'loop' THEN 'LOOP' || CASE WHEN jsonb_typeof(n->'cond') = 'object' THEN ' (while)' ELSE '' END
                     WHEN 'break' THEN 'BREAK' || coalesce(' ' || df._explain_short(n->'value' #>> '{}', 40), '')
                     WHEN 'sleep' THEN 'SLEEP ' || df._seconds(n->'seconds') || 's'
                     WHEN 'wait_for_schedule' THEN 'WAIT_SCHEDULE ' || quote_literal(n->>'cron')
                     WHEN 'wait_for_signal' THEN 'SIGNAL ' || quote_literal(n->>'name')
                          || coalesce(' (' || df._seconds(n->'timeout') || 's)', '')
                     WHEN 'http' THEN 'HTTP ' || coalesce(n->>'method', 'POST') || ' ' || df._explain_short(n->>'url', 40)
                     WHEN 'http_multipart' THEN 'HTTP_MULTIPART ' || coalesce(n->>'method', 'POST') || ' '
                          || df._explain_short(n->>'url', 40)
                     WHEN 'call' THEN 'CALL ' || (n->>'name')
                     WHEN 'activity' THEN 'ACTIVITY ' || (n->>'name')
                     WHEN 'fan_out' THEN 'FAN_OUT over $' || (n->>'over')
                     WHEN 'bind' THEN 'BIND'
                     ELSE upper(n->>'type') END
                     || coalesce(' |=> ' || quote_literal(coalesce(n->>'result_name',
                                                                   CASE WHEN n->>'type' = 'bind' THEN n->>'name' END)), '')
           END;
$$;

CREATE OR REPLACE FUNCTION df._explain_tree(n jsonb, id text, indent integer, lead text, states jsonb)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := n->>'type';
    pad text := repeat(' ', indent + 4);
    out text;
    e record;
    k integer;
BEGIN
    IF t = 'seq' AND NOT n ? 'result_name' THEN
        out := '';
        FOR e IN SELECT x.value, x.ord FROM jsonb_array_elements(n->'steps') WITH ORDINALITY x(value, ord) LOOP
            out := out || df._explain_tree(e.value, id || '.' || (e.ord - 1), indent,
                                           CASE WHEN e.ord = 1 THEN lead ELSE '→ ' END, states);
        END LOOP;
        RETURN out;
    END IF;
    out := repeat(' ', indent) || lead || df._explain_label(n)
        || CASE states->>id WHEN 'completed' THEN ' ✓' WHEN 'failed' THEN ' ✗' WHEN 'running' THEN ' ⏳'
                            WHEN 'pending' THEN ' ○' WHEN 'skipped' THEN ' ⊘' ELSE '' END || E'\n';
    CASE t
    WHEN 'seq' THEN
        FOR e IN SELECT x.value, x.ord FROM jsonb_array_elements(n->'steps') WITH ORDINALITY x(value, ord) LOOP
            out := out || df._explain_tree(e.value, id || '.' || (e.ord - 1), indent + 4,
                                           CASE WHEN e.ord = 1 THEN '' ELSE '→ ' END, states);
        END LOOP;
    WHEN 'join', 'race' THEN
        FOR e IN SELECT x.value, x.ord FROM jsonb_array_elements(n->'branches') WITH ORDINALITY x(value, ord) LOOP
            out := out || pad || '║ branch ' || e.ord || E':\n'
                || df._explain_tree(e.value, id || '.' || (e.ord - 1), indent + 6, '', states);
        END LOOP;
    WHEN 'if', 'if_rows' THEN
        IF jsonb_typeof(n->'cond') = 'object' THEN
            out := out || pad || E'? condition:\n' || df._explain_tree(n->'cond', id || '.0', indent + 6, '', states);
        END IF;
        out := out || pad || E'✓ then:\n' || df._explain_tree(n->'then', id || '.1', indent + 6, '', states);
        IF jsonb_typeof(n->'else') = 'object' THEN
            out := out || pad || E'✗ else:\n' || df._explain_tree(n->'else', id || '.2', indent + 6, '', states);
        END IF;
    WHEN 'loop' THEN
        out := out || pad || E'↻ body:\n' || df._explain_tree(n->'body', id || '.0', indent + 6, '', states);
        IF jsonb_typeof(n->'cond') = 'object' THEN
            out := out || pad || E'? while:\n' || df._explain_tree(n->'cond', id || '.1', indent + 6, '', states);
        END IF;
    WHEN 'bind' THEN
        out := out || df._explain_tree(n->'node', id || '.0', indent + 4, '', states);
    WHEN 'fan_out' THEN
        out := out || pad || E'↳ each:\n' || df._explain_tree(n->'step', id || '.0', indent + 6, '', states);
    ELSE
        NULL;  -- a leaf
    END CASE;
    RETURN out;
END $$;

-- An instance (an 8-hex id), a graph (node JSON, ours or pg_durable's, or a plain SQL statement),
-- or a DSL expression given as text, which is evaluated as the caller.
CREATE OR REPLACE FUNCTION df.explain(input text) RETURNS text LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    expr text := btrim(input);
    graph jsonb;
    inst record;
    states jsonb;
    header text;
BEGIN
    IF expr ~* '^[0-9a-f]{8}$' THEN
        SELECT i.id, i.label, i.status, i.output, i.error, df._instance_graph(i.id) AS graph INTO inst
        FROM df.instances i WHERE i.id = expr;
        IF NOT FOUND THEN
            RETURN format('Instance ''%s'' not found', expr);
        END IF;
        SELECT jsonb_object_agg(n.node_id, n.inferred_status) INTO states FROM df.instance_nodes(expr) n;
        header := 'Instance: ' || inst.id || coalesce(' (' || inst.label || ')', '') || E'\n'
            || 'Status:   ' || CASE WHEN inst.status = 'completed' THEN '✓'
                                    WHEN inst.status IN ('failed', 'cancelled', 'terminated') THEN '✗'
                                    WHEN inst.status = 'running' THEN '⏳' ELSE '○' END || ' ' || inst.status || E'\n'
            || coalesce('Output:   ' || df._explain_short(inst.output::text, 60) || E'\n', '')
            || CASE WHEN inst.status = 'failed'
                    THEN coalesce('Error:    ' || df._explain_short(inst.error->>'message', 60) || E'\n', '') ELSE '' END;
        RETURN header || E'\n' || rtrim(df._explain_tree(inst.graph, 'n0', 0, '', states), E'\n');
    END IF;
    BEGIN
        IF left(expr, 1) <> '{'
           AND expr !~* '^(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|CALL|DO|TRUNCATE|GRANT|REVOKE|EXPLAIN|VALUES|TABLE)\s'
           AND expr ~ '(~>|\|=>|\?>|!>|@>|df\.)' THEN
            EXECUTE format('SELECT (%s)::text', expr) INTO expr;
            IF expr IS NULL THEN
                RETURN 'Expression returned NULL';
            END IF;
        END IF;
        graph := df._normalize(df._node(expr));
        PERFORM df._check_depth(graph);
    EXCEPTION WHEN invalid_parameter_value THEN
        IF SQLERRM LIKE 'Invalid durable function graph:%' THEN
            RETURN SQLERRM;
        END IF;
        RAISE;
    END;
    RETURN rtrim(df._explain_tree(graph, 'n0', 0, '', '{}'::jsonb), E'\n');
END $$;

-- ---------------------------------------------------------------------------------------
-- Privileges.  USAGE on the schema is the gate (ordinary df functions keep PostgreSQL's PUBLIC
-- EXECUTE); df.http and df.http_multipart need include_http; a delegated admin (with_grant)
-- also gets df.grant_usage, df.revoke_usage and df.metrics.
CREATE OR REPLACE FUNCTION df.grant_usage(p_role text, include_http boolean DEFAULT false,
                                          with_grant boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    opt text := CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA df TO %I%s', p_role, opt);
    IF include_http THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION df.http(text, text, text, jsonb, integer), '
                       'df.http_multipart(text, text, jsonb, jsonb, integer) TO %I%s', p_role, opt);
    END IF;
    IF with_grant THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean), df.revoke_usage(text), '
                       'df.metrics() TO %I WITH GRANT OPTION', p_role);
    END IF;
    EXECUTE format('GRANT SELECT ON df.instances, df.nodes TO %I%s', p_role, opt);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON df.vars TO %I%s', p_role, opt);
    EXECUTE format('GRANT INSERT (kind, instance_id, graph, label, search_path, vars, payload), SELECT (instance_id) '
                   'ON df._requests TO %I%s', p_role, opt);
END $$;

-- Takes back what the caller granted (PostgreSQL's rule: a role revokes its own grants; the owner
-- and superusers those of the owner), with everything granted on from them (CASCADE).
CREATE OR REPLACE FUNCTION df.revoke_usage(p_role text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    target oid := to_regrole(quote_ident(p_role));
    me oid := to_regrole(quote_ident(current_user));
    fn record;
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = 'undefined_object';
    END IF;
    FOR fn IN
        SELECT DISTINCT p.oid::regprocedure AS sig
        FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) a
        WHERE p.pronamespace = 'df'::regnamespace AND a.grantee = target
          AND (a.grantor = me OR (a.grantor = p.proowner AND (pg_has_role(me, p.proowner, 'MEMBER')
                                                              OR EXISTS (SELECT 1 FROM pg_roles r
                                                                         WHERE r.oid = me AND r.rolsuper))))
    LOOP
        BEGIN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I CASCADE', fn.sig, p_role);
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;  -- not ours to revoke
        END;
    END LOOP;
    BEGIN
        EXECUTE format('REVOKE SELECT ON df.instances, df.nodes FROM %I CASCADE', p_role);
        EXECUTE format('REVOKE SELECT, INSERT, UPDATE, DELETE ON df.vars FROM %I CASCADE', p_role);
        EXECUTE format('REVOKE INSERT (kind, instance_id, graph, label, search_path, vars, payload), '
                       'SELECT (instance_id) ON df._requests FROM %I CASCADE', p_role);
        EXECUTE format('REVOKE USAGE ON SCHEMA df FROM %I CASCADE', p_role);
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'df.revoke_usage: % may not revoke %''s use of df', current_user, p_role
            USING ERRCODE = 'insufficient_privilege';
    END;
END $$;

REVOKE EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean), df.revoke_usage(text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------
-- Retention, as pg_durable's background reconciliation does it: finished df instances
-- (completed, failed, cancelled; their sub-workflows and history with them) are kept while they
-- are both among the newest `keep` finished ones and younger than `retention_days` (age from
-- completion when completed, else from creation).  Returns how many instances were removed.
-- The worker calls it every pg_durable.reconcile_interval seconds (default 3600; 0: never) with
-- pg_durable.retention_days (default 30) and a cap of 10,000.
CREATE OR REPLACE FUNCTION df._expire(retention_days integer DEFAULT 30, keep integer DEFAULT 10000,
                                      batch integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    doomed text[];
    family text[];
BEGIN
    SELECT coalesce(array_agg(r.instance_id), '{}') INTO doomed FROM (
        SELECT f.instance_id FROM (
            SELECT i.instance_id,
                   CASE WHEN i.status = 'completed' THEN i.updated_at ELSE i.created_at END AS aged_from,
                   row_number() OVER (ORDER BY CASE WHEN i.status = 'completed' THEN i.updated_at ELSE i.created_at END
                                      DESC, i.instance_id) AS rank
            FROM instances i
            WHERE i.name = 'pgdurable.graph' AND i.parent_instance_id IS NULL
              AND i.status IN ('completed', 'failed', 'cancelled')
        ) f
        WHERE f.rank > keep OR f.aged_from < now() - make_interval(days => retention_days)
        ORDER BY f.rank DESC
        LIMIT batch
    ) r;
    IF cardinality(doomed) = 0 THEN
        RETURN 0;
    END IF;
    WITH RECURSIVE tree(instance_id) AS (
        SELECT unnest(doomed)
        UNION
        SELECT c.instance_id FROM instances c JOIN tree t ON c.parent_instance_id = t.instance_id
    )
    SELECT array_agg(instance_id) INTO family FROM tree;
    DELETE FROM orchestrator_queue WHERE instance_id = ANY (family);
    DELETE FROM work_queue WHERE instance_id = ANY (family);
    DELETE FROM timers WHERE instance_id = ANY (family);
    DELETE FROM event_deliveries WHERE instance_id = ANY (family);
    DELETE FROM instances WHERE instance_id = ANY (family) AND is_finished(status);
    DELETE FROM history h WHERE h.instance_id = ANY (family)
        AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = h.instance_id);
    RETURN cardinality(doomed);
END $$;
REVOKE ALL ON FUNCTION df._expire(integer, integer, integer) FROM PUBLIC;

-- A worker role runs the retention pass too.
CREATE OR REPLACE FUNCTION grant_worker(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    PERFORM grant_client(role_name);  -- a worker's Runtime also has a client
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.instances, %1$I.orchestrator_queue, '
                   '%1$I.work_queue, %1$I.timers, %1$I.workers, %1$I.registry, %1$I.instance_values TO %2$I',
                   s, role_name);
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.history TO %2$I', s, role_name);
    EXECUTE format('GRANT SELECT, DELETE ON %1$I.event_deliveries TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION df._expire(integer, integer, integer) TO %I', role_name);
END $$;
