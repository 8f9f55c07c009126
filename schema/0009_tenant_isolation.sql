-- pgdurable_async, version 9: tenants stay inside their role.
--   * instances.submitted_by: the role a graph instance was submitted by, written only by
--     the definer trigger below.  The worker runs a graph's SQL as this role, read from
--     the instance row when the node runs: never from the graph's input or a work item.
--   * df._requests: how df.start, df.signal and df.cancel reach the engine.  The caller
--     INSERTs a request as itself; a column default records current_user (inside a
--     SECURITY DEFINER function that is the function's owner, as PostgreSQL defines it);
--     row-level security refuses a request naming anyone else; a definer trigger then
--     checks the graph (node types, references, the df.http grant, built-in names) and
--     creates the instance or queues the signal, and a second trigger removes the row.
--   * start() refuses the built-in names (pgdurable.*): a client cannot hand the graph
--     interpreter an input of its own making.
SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:df'));  -- `df` is shared by all pgdurable schemas
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

ALTER TABLE instances ADD COLUMN IF NOT EXISTS submitted_by oid;
-- Instances submitted before this version named their role in the input (df._submit checked it).
UPDATE instances i SET submitted_by = r.oid
FROM pg_roles r
WHERE i.name = 'pgdurable.graph' AND i.submitted_by IS NULL AND r.rolname = i.input->>'role';

CREATE OR REPLACE FUNCTION start(name text, input jsonb, instance_id text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    id text := coalesce(instance_id, replace(gen_random_uuid()::text, '-', ''));
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'pgdurable.start: name must be a registered orchestration name';
    END IF;
    IF name LIKE 'pgdurable.%' THEN
        RAISE EXCEPTION 'pgdurable.start: % is a built-in orchestration; graphs are started with df.start', name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM create_instances(ARRAY[id], ARRAY[name], ARRAY[input], ARRAY[NULL::text],
                                                  ARRAY[NULL::integer], ARRAY[NULL::integer])) THEN
        RAISE EXCEPTION 'pgdurable.start: instance % already exists', id USING ERRCODE = 'unique_violation';
    END IF;
    RETURN id;
END $$;

-- A graph as the worker reads it: a JSON string in a node position is a SQL node (as in
-- pgdurable_async/_graph/compiler.py); df._check then checks every node's fields.
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
        n := jsonb_set(n, '{steps}', (SELECT coalesce(jsonb_agg(df._normalize(e.value) ORDER BY e.ord), '[]')
                                      FROM jsonb_array_elements(n->'steps') WITH ORDINALITY e(value, ord)));
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
-- A Python activity as a graph node, from SQL: `df.call_activity('outbox.publish', '{"id": 1}')`.
-- It runs app code with the worker's rights, so, like df.http, it needs its own grant
-- (df.grant_activities(role)); graphs that hold an activity node
-- (a Python DSL graph handed to df.start) need it as well.
CREATE OR REPLACE FUNCTION df.call_activity(name text, input jsonb DEFAULT NULL) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'df.call_activity: name must be a registered activity name';
    END IF;
    RETURN jsonb_build_object('type', 'activity', 'name', name, 'input', input)::text;
END $$;
REVOKE EXECUTE ON FUNCTION df.call_activity(text, jsonb) FROM PUBLIC;

-- What a graph may hold when a role submits it: HTTP nodes only with the df.http grant,
-- activity nodes only with the df.call_activity grant, and no built-in (pgdurable.*) names.
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
        ELSIF n->>'type' = 'http'
              AND NOT has_function_privilege(submitter, 'df.http(text, text, text, jsonb, integer)', 'EXECUTE') THEN
            RAISE EXCEPTION 'df.start: role % may not use df.http (df.grant_usage(role, include_http => true))',
                submitter::regrole USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
END $$;

CREATE TABLE IF NOT EXISTS df._requests (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_by oid NOT NULL DEFAULT to_regrole(quote_ident(current_user))::oid,
    kind         text NOT NULL CHECK (kind IN ('start', 'event_received', 'cancel_requested')),
    instance_id  text,
    graph        jsonb,
    label        text,
    search_path  text,
    vars         jsonb,
    payload      jsonb
);
ALTER TABLE df._requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._requests FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS requests_as_yourself ON df._requests;
CREATE POLICY requests_as_yourself ON df._requests
    USING (requested_by = to_regrole(quote_ident(current_user))::oid)
    WITH CHECK (requested_by = to_regrole(quote_ident(current_user))::oid);
REVOKE ALL ON df._requests FROM PUBLIC;

-- Runs as the schema owner, after the caller's column defaults; the row-level security check on
-- requested_by follows it (a forged request fails there and the whole statement rolls back).
CREATE OR REPLACE FUNCTION df._request_accept() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    doc jsonb;
    id text;
    sub oid;
BEGIN
    IF NEW.kind = 'start' THEN
        IF octet_length(NEW.graph::text) > 4194304 THEN  -- the worker's payload limit (max_payload_bytes)
            RAISE EXCEPTION 'df.start: the graph is too large (% bytes; the limit is 4 MiB)',
                octet_length(NEW.graph::text) USING ERRCODE = 'program_limit_exceeded';
        END IF;
        NEW.graph := df._normalize(NEW.graph);
        PERFORM df._check(NEW.graph, ARRAY[]::text[]);
        PERFORM df._check_policy(NEW.graph, NEW.requested_by);
        doc := jsonb_build_object('graph', NEW.graph, 'vars', coalesce(NEW.vars, '{}'),
                                  'search_path', NEW.search_path, 'label', NEW.label);
        IF NEW.instance_id IS NOT NULL THEN
            IF NOT EXISTS (SELECT 1 FROM create_instances(ARRAY[NEW.instance_id], ARRAY['pgdurable.graph'], ARRAY[doc],
                                                          ARRAY[NULL::text], ARRAY[NULL::integer],
                                                          ARRAY[NULL::integer])) THEN
                RAISE EXCEPTION 'df.start: instance % already exists', NEW.instance_id
                    USING ERRCODE = 'unique_violation';
            END IF;
            id := NEW.instance_id;
        ELSE
            LOOP
                id := lpad(to_hex((random() * 4294967295)::bigint), 8, '0');
                EXIT WHEN EXISTS (SELECT 1 FROM create_instances(ARRAY[id], ARRAY['pgdurable.graph'], ARRAY[doc],
                                                                 ARRAY[NULL::text], ARRAY[NULL::integer],
                                                                 ARRAY[NULL::integer]));
            END LOOP;
        END IF;
        UPDATE instances SET submitted_by = NEW.requested_by WHERE instance_id = id;
        NEW.instance_id := id;
    ELSE
        SELECT i.submitted_by INTO sub FROM instances i
        WHERE i.instance_id = NEW.instance_id AND i.name = 'pgdurable.graph';
        IF sub IS NULL OR NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = sub)
           OR NOT pg_has_role(NEW.requested_by, sub, 'MEMBER') THEN
            RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id USING ERRCODE = 'no_data_found';
        END IF;
        PERFORM send(NEW.instance_id, NEW.kind, NEW.payload);
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION df._request_done() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM df._requests WHERE id = NEW.id;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS requests_accept ON df._requests;
CREATE TRIGGER requests_accept BEFORE INSERT ON df._requests FOR EACH ROW EXECUTE FUNCTION df._request_accept();
DROP TRIGGER IF EXISTS requests_done ON df._requests;
CREATE TRIGGER requests_done AFTER INSERT ON df._requests FOR EACH ROW EXECUTE FUNCTION df._request_done();

-- The one way a graph instance is created: as the calling role (current_user).
DROP FUNCTION IF EXISTS df._submit(text, jsonb, text, text, jsonb);
CREATE OR REPLACE FUNCTION df._submit(graph jsonb, label text DEFAULT NULL, search_path text DEFAULT NULL,
                                      vars jsonb DEFAULT NULL, instance_id text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    INSERT INTO df._requests (kind, graph, label, search_path, vars, instance_id)
    VALUES ('start', graph, label, search_path, vars, instance_id)
    RETURNING instance_id;
$$;

CREATE OR REPLACE FUNCTION df.start(fut text, label text DEFAULT NULL, database text DEFAULT NULL,
                                    transaction_mode text DEFAULT 'caller') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    graph jsonb := df._node(fut);
    mode text := lower(coalesce(transaction_mode, 'caller'));
BEGIN
    IF database IS NOT NULL AND database <> current_database() THEN
        RAISE EXCEPTION 'df.start: database % is not this database (%); start it there', database, current_database();
    END IF;
    IF mode = 'new' THEN
        RETURN df._start_new(fut, label);
    ELSIF mode <> 'caller' THEN
        RAISE EXCEPTION 'df.start: transaction_mode must be ''caller'' or ''new'', not %', quote_literal(transaction_mode);
    END IF;
    RETURN df._submit(graph, label, current_setting('search_path'),
                      (SELECT jsonb_object_agg(v.name, v.value) FROM df.vars v
                       WHERE v.owner = quote_ident(current_user)::regrole));
END $$;

-- Signals and cancels are requests too: as the caller, to an instance the caller may act for.
DROP FUNCTION IF EXISTS df._send(text, text, jsonb);
CREATE OR REPLACE FUNCTION df._request(kind text, instance_id text, payload jsonb) RETURNS void
LANGUAGE sql VOLATILE AS $$
    INSERT INTO df._requests (kind, instance_id, payload) VALUES (kind, instance_id, payload);
$$;

CREATE OR REPLACE FUNCTION df.signal(instance_id text, signal_name text, signal_data text DEFAULT '{}')
RETURNS text LANGUAGE plpgsql STRICT AS $$
DECLARE
    data jsonb;
BEGIN
    IF instance_id = '' THEN
        RAISE EXCEPTION 'Instance ID cannot be empty';
    END IF;
    IF signal_name = '' THEN
        RAISE EXCEPTION 'Signal name cannot be empty';
    END IF;
    BEGIN
        data := signal_data::jsonb;
    EXCEPTION WHEN others THEN
        data := to_jsonb(signal_data);
    END;
    PERFORM df._request('event_received', instance_id, jsonb_build_object('name', signal_name, 'data', data));
    RETURN 'OK';
END $$;

CREATE OR REPLACE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user') RETURNS text
LANGUAGE plpgsql STRICT AS $$
BEGIN
    PERFORM df._request('cancel_requested', instance_id, jsonb_build_object('reason', reason));
    RETURN format('Instance %s cancelled: %s', instance_id, reason);
END $$;

CREATE OR REPLACE VIEW df.instances WITH (security_barrier) AS
SELECT i.instance_id::varchar(8)                       AS id,
       i.input->>'label'                               AS label,
       'n0'::varchar(8)                                AS root_node,
       i.status,
       r.oid::regrole                                  AS submitted_by,
       current_database()::text COLLATE "default"      AS database,
       i.created_at,
       i.updated_at,
       CASE WHEN i.status = 'completed' THEN i.updated_at END AS completed_at,
       i.name                                          AS function_name,
       i.execution_id::bigint                          AS execution_count,
       i.output,
       i.error
FROM instances i
JOIN pg_roles r ON r.oid = i.submitted_by
WHERE i.name = 'pgdurable.graph' AND i.parent_instance_id IS NULL
  AND pg_has_role(current_user, r.oid, 'MEMBER');

CREATE OR REPLACE FUNCTION df._instance_nodes(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text, right_node text,
               status text, result text, status_details text, inferred_status text,
               inferred_status_from_ancestor_id text, updated_at timestamptz, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    inst record;
    r record;
    st jsonb := '{}';      -- node id -> inferred status
    kids text[];
    k text;
    s text;
    pass int;
    finished boolean;
BEGIN
    SELECT i.* INTO inst FROM instances i JOIN pg_roles ro ON ro.oid = i.submitted_by
    WHERE i.instance_id = instance_id_param AND i.name = 'pgdurable.graph'
      AND pg_has_role(session_user, ro.oid, 'MEMBER');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'df.instance_nodes: instance % not found', instance_id_param
            USING ERRCODE = 'no_data_found';
    END IF;
    finished := inst.status IN ('completed', 'failed', 'cancelled', 'terminated');
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.df_nodes (
        node_id text PRIMARY KEY, parent_id text, depth int, pos int, node jsonb,
        status text, result text, details text, at timestamptz, error text) ON COMMIT DROP;
    DELETE FROM pg_temp.df_nodes;
    INSERT INTO pg_temp.df_nodes
    SELECT g.node_id, g.parent_id, g.depth, g.pos, g.node, a.status, a.result, a.details, a.at, a.error
    FROM df._graph_nodes(inst.input->'graph') g
    LEFT JOIN LATERAL (
        SELECT CASE d.event_type WHEN 'activity_completed' THEN 'completed'
                                 WHEN 'activity_failed' THEN 'failed' ELSE 'running' END AS status,
               -- a SQL node's result without the interpreter's private column types
               coalesce(CASE jsonb_typeof(d.payload->'result')
                             WHEN 'object' THEN (d.payload->'result') - '_pgdurable_columns'
                             ELSE d.payload->'result' END,
                        d.payload->'error')::text AS result,
               jsonb_build_object('execution_id', h.instance_id || '::' || h.execution_id,
                                  'task_id', h.payload->'task_id')::text AS details,
               coalesce(d.recorded_at, h.recorded_at) AS at,
               coalesce(d.payload->'error'->>'message', d.payload->>'error') AS error
        FROM history h
        LEFT JOIN history d ON d.instance_id = h.instance_id AND d.execution_id = h.execution_id
             AND d.event_type IN ('activity_completed', 'activity_failed') AND d.payload->'task_id' = h.payload->'task_id'
        WHERE h.instance_id = inst.instance_id AND h.execution_id = inst.execution_id
          AND h.event_type = 'activity_scheduled' AND h.payload->'input'->>'node' = g.node_id
        ORDER BY h.seq DESC LIMIT 1
    ) a ON true;
    FOR r IN SELECT * FROM pg_temp.df_nodes WHERE status IS NOT NULL LOOP
        st := st || jsonb_build_object(r.node_id, r.status);
    END LOOP;
    FOR pass IN 1..3 LOOP  -- children before parents; a few passes settle sibling rules
        FOR r IN SELECT * FROM pg_temp.df_nodes n WHERE n.status IS NULL ORDER BY n.depth DESC, n.pos LOOP
            SELECT array_agg(coalesce(st->>c.node_id, 'pending') ORDER BY c.pos) INTO kids
            FROM pg_temp.df_nodes c WHERE c.parent_id = r.node_id;
            IF kids IS NULL THEN  -- a leaf without its own record: done once its successors started
                s := CASE WHEN EXISTS (SELECT 1 FROM pg_temp.df_nodes sib
                                       JOIN pg_temp.df_nodes p ON p.node_id = sib.parent_id
                                       WHERE sib.parent_id = r.parent_id AND sib.pos > r.pos
                                         AND p.node->>'type' = 'seq'
                                         AND coalesce(st->>sib.node_id, 'pending') <> 'pending')
                          THEN 'completed' ELSE 'pending' END;
            ELSIF r.node->>'type' = 'seq' THEN
                s := CASE WHEN 'failed' = ANY (kids) THEN 'failed'
                          WHEN kids[cardinality(kids)] = 'completed' THEN 'completed'
                          WHEN kids <> array_fill('pending'::text, ARRAY[cardinality(kids)]) THEN 'running'
                          ELSE 'pending' END;
            ELSIF r.node->>'type' = 'join' THEN
                s := CASE WHEN 'failed' = ANY (kids) THEN 'failed'
                          WHEN kids = array_fill('completed'::text, ARRAY[cardinality(kids)]) THEN 'completed'
                          WHEN 'running' = ANY (kids) OR 'completed' = ANY (kids) THEN 'running'
                          ELSE 'pending' END;
            ELSE  -- race, if, if_rows, bind, loop, fan_out
                s := CASE WHEN r.node->>'type' IN ('race', 'bind', 'fan_out') AND 'completed' = ANY (kids) THEN 'completed'
                          WHEN r.node->>'type' IN ('if', 'if_rows') AND kids[1] = 'completed'
                               AND 'completed' = ANY (kids[2:]) THEN 'completed'
                          WHEN 'failed' = ANY (kids) THEN 'failed'
                          WHEN 'running' = ANY (kids) OR 'completed' = ANY (kids) THEN 'running'
                          ELSE 'pending' END;
            END IF;
            st := st || jsonb_build_object(r.node_id, s);
        END LOOP;
    END LOOP;
    IF inst.status = 'completed' THEN
        st := st || jsonb_build_object('n0', 'completed');
    END IF;
    FOR r IN SELECT * FROM pg_temp.df_nodes ORDER BY node_id LOOP
        node_id := r.node_id;
        node_type := upper(r.node->>'type');
        query := CASE WHEN r.node->>'type' = 'sql' THEN r.node->>'query'
                      ELSE (r.node - ARRAY['steps', 'branches', 'node', 'cond', 'then', 'else', 'body', 'step'])::text END;
        result_name := CASE WHEN r.node->>'type' = 'bind' THEN r.node->>'name' END;
        SELECT min(c.node_id) FILTER (WHERE c.pos = 0), min(c.node_id) FILTER (WHERE c.pos = 1)
            INTO left_node, right_node FROM pg_temp.df_nodes c WHERE c.parent_id = r.node_id;
        status := coalesce(r.status, CASE WHEN st->>r.node_id = 'running' AND finished THEN 'failed'
                                          ELSE st->>r.node_id END);
        result := r.result;
        status_details := r.details;
        inferred_status := st->>r.node_id;
        inferred_status_from_ancestor_id := NULL;
        IF finished AND inferred_status IN ('pending', 'running') THEN
            inferred_status := 'skipped';
            inferred_status_from_ancestor_id := r.parent_id;
        END IF;
        updated_at := coalesce(r.at, inst.updated_at);
        error := r.error;
        RETURN NEXT;
    END LOOP;
    DELETE FROM pg_temp.df_nodes;
END $$;

CREATE OR REPLACE FUNCTION df.instance_executions(instance_id text, limit_count integer DEFAULT 5)
RETURNS TABLE (execution_id bigint, status text, event_count bigint, duration_ms bigint, output text)
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
BEGIN
    IF limit_count < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM instances i JOIN pg_roles ro ON ro.oid = i.submitted_by
                   WHERE i.instance_id = instance_executions.instance_id AND i.name = 'pgdurable.graph'
                     AND pg_has_role(session_user, ro.oid, 'MEMBER')) THEN
        RETURN;  -- not found or not visible: no history to show, as in pg_durable
    END IF;
    RETURN QUERY
    SELECT e.execution_id::bigint,
           CASE last.event_type WHEN 'orchestration_completed' THEN 'Completed'
                                WHEN 'continued_as_new' THEN 'ContinuedAsNew'
                                WHEN 'orchestration_failed' THEN 'Failed'
                                WHEN 'orchestration_cancelled' THEN 'Failed'
                                WHEN 'orchestration_terminated' THEN 'Failed'
                                ELSE 'Running' END,
           e.events,
           CASE WHEN last.event_type IN ('orchestration_completed', 'continued_as_new', 'orchestration_failed',
                                         'orchestration_cancelled', 'orchestration_terminated')
                THEN (extract(epoch FROM last.recorded_at - e.started) * 1000)::bigint ELSE 0 END,
           CASE last.event_type WHEN 'orchestration_completed' THEN (last.payload->'output')::text
                                WHEN 'continued_as_new' THEN (last.payload->'input')::text
                                WHEN 'orchestration_failed' THEN (last.payload->'error')::text
                                WHEN 'orchestration_cancelled' THEN (last.payload->'reason')::text
                                WHEN 'orchestration_terminated' THEN (last.payload->'reason')::text END
    FROM (SELECT h.execution_id, count(*) AS events, min(h.recorded_at) AS started, max(h.seq) AS last_seq
          FROM history h WHERE h.instance_id = instance_executions.instance_id
          GROUP BY h.execution_id
          ORDER BY h.execution_id DESC LIMIT least(limit_count, 10000)) e
    JOIN history last ON last.instance_id = instance_executions.instance_id
                     AND last.execution_id = e.execution_id AND last.seq = e.last_seq
    ORDER BY e.execution_id DESC;
END $$;

CREATE OR REPLACE FUNCTION df.grant_usage(p_role text, include_http boolean DEFAULT false,
                                          with_grant boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    opt text := CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END;
    fn record;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA df TO %I%s', p_role, opt);
    FOR fn IN SELECT p.oid::regprocedure AS sig, p.proname FROM pg_proc p WHERE p.pronamespace = 'df'::regnamespace LOOP
        CONTINUE WHEN fn.proname = 'http' AND NOT include_http;
        CONTINUE WHEN fn.proname IN ('call_activity', 'grant_activities');  -- df.grant_activities gives it
        CONTINUE WHEN fn.proname IN ('grant_usage', 'revoke_usage', 'metrics') AND NOT with_grant;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I%s', fn.sig, p_role, opt);
    END LOOP;
    EXECUTE format('GRANT SELECT ON df.instances, df.nodes TO %I%s', p_role, opt);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON df.vars TO %I%s', p_role, opt);
    EXECUTE format('GRANT INSERT (kind, instance_id, graph, label, search_path, vars, payload), SELECT (instance_id) '
                   'ON df._requests TO %I%s', p_role, opt);
END $$;

CREATE OR REPLACE FUNCTION df.revoke_usage(p_role text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    fn record;
BEGIN
    FOR fn IN SELECT p.oid::regprocedure AS sig FROM pg_proc p WHERE p.pronamespace = 'df'::regnamespace LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', fn.sig, p_role);
    END LOOP;
    EXECUTE format('REVOKE ALL ON df.instances, df.nodes, df.vars, df._requests FROM %I', p_role);
    EXECUTE format('REVOKE USAGE ON SCHEMA df FROM %I', p_role);
END $$;

-- Beyond pg_durable: activity nodes from SQL need this on top of df.grant_usage.
CREATE OR REPLACE FUNCTION df.grant_activities(p_role text, with_grant boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT EXECUTE ON FUNCTION df.call_activity(text, jsonb) TO %I%s', p_role,
                   CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END);
END $$;

REVOKE EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean), df.revoke_usage(text),
    df.grant_activities(text, boolean), df.http(text, text, text, jsonb, integer) FROM PUBLIC;

-- Roles granted df before this version get what the new functions need.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT a.grantee::regrole AS grantee, a.is_grantable
             FROM pg_namespace n, aclexplode(n.nspacl) a
             WHERE n.nspname = 'df' AND a.privilege_type = 'USAGE' AND a.grantee <> 0
               AND a.grantee <> n.nspowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION df._submit(jsonb, text, text, jsonb, text), '
                       'df._request(text, text, jsonb), df._check_policy(jsonb, oid), df._normalize(jsonb) '
                       'TO %s%s',
                       r.grantee, CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        EXECUTE format('GRANT INSERT (kind, instance_id, graph, label, search_path, vars, payload), '
                       'SELECT (instance_id) ON df._requests TO %s%s',
                       r.grantee, CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END $$;
