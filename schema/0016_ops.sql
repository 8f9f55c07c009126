-- pgdurable_async, operations: what metrics and traces need from the database.
--   * instances.trace_context: the W3C trace context ({"traceparent": ..., "tracestate": ...})
--     of the client.start call that created the instance (NULL when the caller traced
--     nothing), so the instance's turn and activity spans join the caller's trace from
--     any worker process.  A child instance has none of its own: readers look up its
--     ancestors'.
--   * start(name, input, instance_id, trace_context): start() plus the trace context; the
--     three-argument start() is unchanged (a caller without tracing keeps using it).
--   * workers.running_since: when the longest-running activity of this worker started
--     (NULL: none running), reported by the worker with its lease extensions, for the
--     database-wide pgdurable_activity_oldest_running_seconds gauge.
--   * grant_client covers the new start(); roles granted before this version get it here.
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

ALTER TABLE instances ADD COLUMN IF NOT EXISTS trace_context jsonb;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS running_since timestamptz;

CREATE OR REPLACE FUNCTION start(name text, input jsonb, instance_id text, trace_context jsonb) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    id text;
BEGIN
    IF trace_context IS NOT NULL
       AND (jsonb_typeof(trace_context) <> 'object' OR octet_length(trace_context::text) > 4096) THEN
        RAISE EXCEPTION 'pgdurable.start: trace_context must be a JSON object of at most 4096 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    id := start(name, input, instance_id);
    IF trace_context IS NOT NULL THEN
        UPDATE instances i SET trace_context = start.trace_context WHERE i.instance_id = id;
    END IF;
    RETURN id;
END $$;
REVOKE ALL ON FUNCTION start(text, jsonb, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION grant_client(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, role_name);
    EXECUTE format('GRANT SELECT ON %1$I.instances, %1$I.history, %1$I.registry, %1$I.schema_migrations, '
                   '%1$I.instance_values, %1$I.schedules TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.start(text, jsonb, text), %1$I.send(text, text, jsonb), '
                   '%1$I.raise_event(text, text, jsonb), %1$I.cancel(text, text), '
                   '%1$I.fork(text, integer, text), %1$I.start(text, jsonb, text, jsonb) TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   '%1$I.create_schedule(text, text, jsonb, text, interval, text, text, text, timestamptz), '
                   '%1$I.set_schedule_paused(text, boolean, timestamptz), %1$I.delete_schedule(text), '
                   '%1$I.trigger_schedule(text) TO %2$I', s, role_name);
END $$;

REVOKE ALL ON FUNCTION grant_client(text) FROM PUBLIC;

-- Roles granted before this version get what their grant now includes.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT grantee FROM information_schema.role_table_grants
             WHERE table_schema = current_schema() AND table_name = 'instances'
               AND privilege_type = 'SELECT' AND grantee <> current_user
    LOOP
        IF EXISTS (SELECT 1 FROM information_schema.role_table_grants g
                   WHERE g.table_schema = current_schema() AND g.table_name = 'instances'
                     AND g.privilege_type = 'DELETE' AND g.grantee = r.grantee) THEN
            PERFORM grant_worker(r.grantee);
        ELSE
            PERFORM grant_client(r.grantee);
        END IF;
    END LOOP;
END $$;
