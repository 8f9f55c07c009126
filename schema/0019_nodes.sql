-- pgdurable_async, version 19: pg_durable's lineage stamps, and the superuser guard's message.
--   * df.nodes.status_details->>'execution_id' is composed as pg_durable composes it: the
--     instance id and the node's execution, then one `::<node id>::<generation>` segment for each
--     scope around the node, outermost first.  A scope is a JOIN or RACE branch, or a loop off the
--     root spine (a loop that is a branch's root is one scope, not two); the loop node and its
--     body share the loop's scope.  A loop scope's generation is its iteration (from 1) when the
--     node last changed, a branch's is 1.  Only the stamps change, not how anything runs.
--   * df.start refused for a superuser names pg_durable.enable_superuser_instances in the message
--     itself, not only in the hint.

SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:df'));  -- `df` is shared by all pgdurable schemas
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

-- Node states and their lineage stamps (see 0014 for the inference rules).
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
                ELSE jsonb_build_object('execution_id', inst.instance_id || '::' || p.execution_id || coalesce(
                    (SELECT string_agg('::' || s.id || '::' || CASE WHEN sg.node->>'type' = 'loop'
                         THEN 1 + coalesce((SELECT it.iteration FROM iters it WHERE it.node_id = s.id AND it.at <= p.at
                                            ORDER BY it.at DESC LIMIT 1), 0)
                         ELSE 1 END, '' ORDER BY s.ord)
                     FROM unnest(w.scopes) WITH ORDINALITY s(id, ord) JOIN g sg ON sg.node_id = s.id), ''))::text END,
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

-- df.start's checks on a request (0014's, with the setting named in the superuser message).
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
            RAISE EXCEPTION 'df.start: role % is a superuser, and superuser instances are disabled (pg_durable.enable_superuser_instances is off)',
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
