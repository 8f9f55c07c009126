-- pgdurable_async, version 20: pg_durable's 8-hex node ids on the df surface.
--   * df.nodes, df.instance_nodes, df.instances.root_node and the lineage stamps in status_details
--     name a node by 8 hex digits, as pg_durable does: the first 8 of md5(<instance id>:<path>),
--     where the path is the node's place in the graph (n0, n0.1, ...); a second node of the same
--     instance with the same digits gets md5(<instance id>:<path>#<rank>)'s instead.  So an id is
--     stable for the instance's life, differs between instances, and is unique within one.
--     The same ids appear in left_node, right_node, inferred_status_from_ancestor_id and the
--     child ids inside query (condition_node, extra_nodes, steps).
--   * Internally everything keeps the paths (the graph_node history events, the CLI's and the
--     dashboard's pictures); only what df shows changes.  df._node_rows gives both.

SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:df'));  -- `df` is shared by all pgdurable schemas
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

-- The first 8 hex digits of md5(<instance id>:<path>).
CREATE OR REPLACE FUNCTION df._node_key(instance_id text, path text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT left(md5(instance_id || ':' || path), 8);
$$;

-- Every node path of an instance's graph mapped to its 8-hex id (see the header for collisions).
CREATE OR REPLACE FUNCTION df._node_ids(instance_id text, graph jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(k.node_id, CASE WHEN k.rank = 1 THEN k.key
                                                     ELSE df._node_key(instance_id, k.node_id || '#' || k.rank) END),
                    '{}'::jsonb)
    FROM (SELECT g.node_id, h.key, row_number() OVER (PARTITION BY h.key ORDER BY g.node_id) AS rank
          FROM df._graph_nodes(graph) g CROSS JOIN LATERAL (SELECT df._node_key(instance_id, g.node_id) AS key) h) k;
$$;

-- df.instances' root_node is the root's id.
CREATE OR REPLACE VIEW df.instances WITH (security_barrier) AS
SELECT i.instance_id::varchar(8)                       AS id,
       i.input->>'label'                               AS label,
       df._node_key(i.instance_id, 'n0')::varchar(8) AS root_node,
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

-- A node's config as pg_durable shows it in `query`, child nodes named by their ids.
CREATE OR REPLACE FUNCTION df._node_config(n jsonb, node_id text, ids jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
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
        WHEN 'if' THEN jsonb_build_object('condition_node', ids->>(node_id || '.0'))::text
        WHEN 'if_rows' THEN (jsonb_build_object('condition_type', 'result_has_rows', 'result_name', n->>'name')
                             || CASE WHEN jsonb_typeof(n->'cond') = 'object'
                                     THEN jsonb_build_object('condition_node', ids->>(node_id || '.0'))
                                     ELSE '{}'::jsonb END)::text
        WHEN 'loop' THEN CASE WHEN jsonb_typeof(n->'cond') = 'object'
                              THEN jsonb_build_object('condition_node', ids->>(node_id || '.1'))::text END
        WHEN 'join' THEN CASE WHEN jsonb_array_length(n->'branches') > 2
                              THEN jsonb_build_object('extra_nodes', (SELECT jsonb_agg(ids->>(node_id || '.' || k) ORDER BY k)
                                  FROM generate_series(2, jsonb_array_length(n->'branches') - 1) k))::text END
        WHEN 'seq' THEN CASE WHEN jsonb_array_length(n->'steps') > 2
                             THEN jsonb_build_object('steps', (SELECT jsonb_agg(ids->>(node_id || '.' || k) ORDER BY k)
                                 FROM generate_series(0, jsonb_array_length(n->'steps') - 1) k))::text END
        WHEN 'call' THEN jsonb_build_object('name', n->>'name', 'input', n->'input')::text
        WHEN 'activity' THEN jsonb_build_object('name', n->>'name', 'input', n->'input')::text
        WHEN 'fan_out' THEN jsonb_build_object('over', n->>'over', 'as', n->>'as', 'limit', n->'limit')::text
    END;
$$;

DROP FUNCTION df._node_config(jsonb, text);

-- Node states with pg_durable's ids (0019's rules), and each node's path last.
CREATE OR REPLACE FUNCTION df._node_rows(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text, right_node text,
               status text, result text, status_details text, inferred_status text,
               inferred_status_from_ancestor_id text, updated_at timestamptz, error text, path text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT SET jit TO off AS $$
#variable_conflict use_column
DECLARE
    inst record;
    finished boolean;
    spine text[];
    ids jsonb;
BEGIN
    SELECT i.* INTO inst FROM instances i WHERE i.instance_id = instance_id_param AND df._visible(i.instance_id);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'df.instance_nodes: instance % not found', instance_id_param
            USING ERRCODE = 'no_data_found';
    END IF;
    finished := is_finished(inst.status);
    ids := df._node_ids(inst.instance_id, inst.input->'graph');
    -- loops that continue as new (the root, or a step of a root sequence) run in the instance's own scope
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
    ), iters AS (  -- every iteration of every loop
        SELECT h.payload->>'node' AS node_id, (h.execution_id::bigint << 32) + h.seq AS at,
               (h.payload->>'iteration')::bigint AS iteration
        FROM history h
        WHERE h.instance_id = inst.instance_id AND h.event_type = 'graph_node' AND h.payload ? 'iteration'
    ), iterations AS (
        SELECT i.node_id, max(i.at) AS at FROM iters i GROUP BY i.node_id
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
               false AS superseded, p.state IN ('completed', 'failed') AS terminal,
               p.node->>'type' AS kind, ARRAY[]::text[] AS scopes
        FROM phys p WHERE p.parent_id IS NULL
        UNION ALL
        SELECT c.node_id,
               CASE WHEN w.terminal AND NOT w.superseded THEN w.node_id ELSE w.decided_from END,
               x.loop_at, x.loop_id,
               coalesce(c.at < x.loop_at, false),
               c.state IN ('completed', 'failed'),
               c.node->>'type',
               w.scopes || CASE WHEN w.kind IN ('join', 'race')
                                     OR (c.node->>'type' = 'loop' AND NOT c.node_id = ANY (spine))
                                THEN ARRAY[c.node_id] ELSE ARRAY[]::text[] END
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
    SELECT ids->>p.node_id,
           df._node_type(p.node),
           df._node_config(p.node, p.node_id, ids),
           CASE WHEN p.node->>'type' = 'bind' THEN p.node->>'name' ELSE p.node->>'result_name' END,
           ids->>(SELECT min(c.node_id) FROM g c WHERE c.parent_id = p.node_id
                AND c.pos = CASE p.node->>'type' WHEN 'if' THEN 1 WHEN 'if_rows' THEN 1 ELSE 0 END),
           ids->>(SELECT min(c.node_id) FROM g c WHERE c.parent_id = p.node_id
                AND c.pos = CASE p.node->>'type' WHEN 'if' THEN 2 WHEN 'if_rows' THEN 2 WHEN 'loop' THEN -1 ELSE 1 END),
           p.state,
           CASE p.state WHEN 'completed' THEN (p.fact->'result')::text
                        WHEN 'failed' THEN to_jsonb(coalesce(p.fact->>'error', 'failed'))::text END,
           CASE WHEN p.execution_id IS NULL THEN NULL
                ELSE jsonb_build_object('execution_id', inst.instance_id || '::' || p.execution_id || coalesce(
                    (SELECT string_agg('::' || (ids->>s.id) || '::' || CASE WHEN sg.node->>'type' = 'loop'
                         THEN 1 + coalesce((SELECT it.iteration FROM iters it WHERE it.node_id = s.id AND it.at <= p.at
                                            ORDER BY it.at DESC LIMIT 1), 0)
                         ELSE 1 END, '' ORDER BY s.ord)
                     FROM unnest(w.scopes) WITH ORDINALITY s(id, ord) JOIN g sg ON sg.node_id = s.id), ''))::text END,
           CASE WHEN w.terminal AND NOT w.superseded THEN p.state
                WHEN w.decided_from IS NOT NULL OR finished THEN 'skipped'
                WHEN w.superseded THEN 'pending'
                WHEN p.state = 'running' THEN 'running'
                ELSE 'pending' END,
           ids->>CASE WHEN w.terminal AND NOT w.superseded THEN NULL
                      WHEN w.decided_from IS NOT NULL THEN w.decided_from
                      WHEN finished THEN CASE WHEN p.node_id <> 'n0' THEN 'n0' END
                      WHEN w.superseded THEN w.loop_id END,
           coalesce(p.recorded_at, inst.created_at),
           p.fact->>'error',
           p.node_id
    FROM phys p JOIN walk w ON w.node_id = p.node_id
    ORDER BY p.node_id;
END $$;

-- pg_durable's df.instance_nodes, ids in place of paths.
CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text, right_node text,
               status text, result text, status_details text, inferred_status text,
               inferred_status_from_ancestor_id text, updated_at timestamptz)
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT n.node_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status, n.result,
           n.status_details, n.inferred_status, n.inferred_status_from_ancestor_id, n.updated_at
    FROM df._node_rows(instance_id_param) n;
$$;

-- Every node of every visible instance (computed per instance), pg_durable's columns first.
CREATE OR REPLACE VIEW df.nodes AS
SELECT n.node_id::text AS id, i.id AS instance_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
       n.status, n.result::jsonb AS result, n.error, i.submitted_by, i.database, i.created_at, n.updated_at,
       n.status_details::jsonb AS status_details, n.inferred_status, n.inferred_status_from_ancestor_id
FROM df.instances i
CROSS JOIN LATERAL df._node_rows(i.id) n;

DROP FUNCTION df._instance_nodes(text);  -- df._node_rows replaces it

-- df.explain reads node states by path.
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
        SELECT jsonb_object_agg(n.path, n.inferred_status) INTO states FROM df._node_rows(expr) n;
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
