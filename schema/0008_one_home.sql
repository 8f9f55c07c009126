-- pgdurable_async, version 8: one definition each of "finished" and of "create an instance".
--   * is_finished(status): the statuses an instance never leaves (Python's twin is
--     Status.is_terminal); the guards, the completion NOTIFY and send() use it.
--   * create_instances(...): an instance row and its start message, for many instances in
--     one statement; start() (the client API) and the turns' child starts use it.
--   * SECURITY DEFINER functions of this schema resolve names with pg_temp last.  A
--     database migrated in several runs had captured a search_path without it (only 0002
--     appended pg_temp, for its own transaction), so a caller's temporary table could
--     stand in for one of ours inside them; every function with a captured search_path is
--     reset to "<schema>, pg_temp" here.
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

CREATE OR REPLACE FUNCTION is_finished(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT status IN ('completed', 'failed', 'cancelled', 'terminated')
$$;

CREATE OR REPLACE FUNCTION create_instances(ids text[], names text[], inputs jsonb[], parents text[],
                                            parent_executions integer[], parent_tasks integer[])
RETURNS SETOF text LANGUAGE sql SET search_path FROM CURRENT AS $$
    WITH created AS (
        INSERT INTO instances (instance_id, name, status, input,
                               parent_instance_id, parent_execution_id, parent_task_id)
        SELECT c.id, c.name, 'pending', c.input, c.parent, c.parent_execution, c.parent_task
        FROM unnest(ids, names, inputs, parents, parent_executions, parent_tasks)
             AS c(id, name, input, parent, parent_execution, parent_task)
        ON CONFLICT (instance_id) DO NOTHING
        RETURNING instance_id, name, input
    )
    INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
    SELECT instance_id, 1, name, 'orchestration_started', jsonb_build_object('name', name, 'input', input)
    FROM created
    RETURNING instance_id
$$;
REVOKE ALL ON FUNCTION create_instances(text[], text[], jsonb[], text[], integer[], integer[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION start(name text, input jsonb, instance_id text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    id text := coalesce(instance_id, replace(gen_random_uuid()::text, '-', ''));
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'pgdurable.start: name must be a registered orchestration name';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM create_instances(ARRAY[id], ARRAY[name], ARRAY[input], ARRAY[NULL::text],
                                                  ARRAY[NULL::integer], ARRAY[NULL::integer])) THEN
        RAISE EXCEPTION 'pgdurable.start: instance % already exists', id USING ERRCODE = 'unique_violation';
    END IF;
    RETURN id;
END $$;

CREATE OR REPLACE FUNCTION send(instance_id text, kind text, payload jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    st text;
BEGIN
    SELECT i.status INTO st FROM instances i WHERE i.instance_id = send.instance_id;
    IF st IS NULL THEN
        RAISE EXCEPTION 'instance % not found', send.instance_id USING ERRCODE = 'no_data_found';
    END IF;
    IF is_finished(st) THEN
        RETURN;  -- a finished instance ignores events and cancels
    END IF;
    IF payload ? 'delivery_key' THEN
        INSERT INTO event_deliveries (instance_id, delivery_key)
        VALUES (send.instance_id, payload ->> 'delivery_key')
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN;  -- delivered before
        END IF;
    END IF;
    INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
    SELECT i.instance_id, NULL, i.name, send.kind, send.payload - 'delivery_key'
    FROM instances i WHERE i.instance_id = send.instance_id;
END $$;

CREATE OR REPLACE FUNCTION instance_delete_guard() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    IF NOT is_finished(OLD.status) THEN
        RAISE EXCEPTION 'pgdurable instance % is %: only finished instances can be deleted', OLD.instance_id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END $$;

DROP TRIGGER IF EXISTS instances_done_notify ON instances;
CREATE TRIGGER instances_done_notify AFTER UPDATE OF status ON instances
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND is_finished(NEW.status))
    EXECUTE FUNCTION notify_done();

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS signature
             FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f.signature, current_schema());
    END LOOP;
END $$;
