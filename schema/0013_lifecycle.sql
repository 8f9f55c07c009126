-- pgdurable_async, version 13: the instance lifecycle.
--   * instances_parent: an instance's children, for cascading cancel and terminate and for
--     purging children with their parent (partial: roots, most instances, cost nothing).
--   * instance_values: the durable values of ctx.set_value, one row per (instance, key),
--     written by the turn that records the value_set event; a statement-level trigger
--     sends NOTIFY <schema>_value with each changed instance's id (Client.wait_value).
--   * fork(source, at_seq, new_id): a new instance whose history is a copy of the source's
--     first events plus forked_from, and a 'resume' message for its first turn.
--   * grant_client / grant_worker cover the new table and function; roles granted before
--     this version get the same rights here.
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

CREATE INDEX IF NOT EXISTS instances_parent ON instances (parent_instance_id)
    WHERE parent_instance_id IS NOT NULL;

-- Named values an instance published (ctx.set_value); they outlive the instance until it is purged.
CREATE TABLE IF NOT EXISTS instance_values (
    instance_id  text NOT NULL,
    key          text NOT NULL,
    value        jsonb,
    execution_id integer NOT NULL,
    seq          integer NOT NULL,          -- the value_set event that wrote it
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, key)
);

-- A value set: wakes Client.wait_value (payload: the instance id, once per instance and statement).
CREATE OR REPLACE FUNCTION notify_value() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_value', changed.instance_id)
    FROM (SELECT DISTINCT instance_id FROM new_rows) AS changed;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS instance_values_insert_notify ON instance_values;
CREATE TRIGGER instance_values_insert_notify AFTER INSERT ON instance_values
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_value();
DROP TRIGGER IF EXISTS instance_values_update_notify ON instance_values;
CREATE TRIGGER instance_values_update_notify AFTER UPDATE ON instance_values
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_value();

-- A new instance of the source's orchestration and input whose history is the source's events
-- with seq <= at_seq (current execution), then forked_from.  Default at_seq: every event before
-- the first activity_failed / sub_orchestration_failed / orchestration_failed; with none, every
-- event before a cancel request or the end.  Its first turn replays the copy with today's code
-- and re-issues what the copy left open (the 'resume' message).  Values and custom status
-- are those of the copied events.  Graph instances (pgdurable.*) are not forked.
CREATE OR REPLACE FUNCTION fork(source_id text, at_seq integer DEFAULT NULL, new_id text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    id text := coalesce(new_id, replace(gen_random_uuid()::text, '-', ''));
    cut integer := at_seq;
    src_name text;
    src_execution integer;
    last_seq integer;
    end_seq integer;
    first_failure integer;
    first_stop integer;
    started jsonb;
BEGIN
    SELECT i.name, i.execution_id INTO src_name, src_execution FROM instances i WHERE i.instance_id = source_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'instance % not found', source_id USING ERRCODE = 'no_data_found';
    END IF;
    IF src_name LIKE 'pgdurable.%' THEN
        RAISE EXCEPTION 'pgdurable.fork: % is a built-in orchestration; graph instances cannot be forked', src_name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT max(h.seq),
           min(h.seq) FILTER (WHERE h.event_type IN ('orchestration_completed', 'orchestration_failed',
                                                    'orchestration_cancelled', 'orchestration_terminated',
                                                    'continued_as_new')),
           min(h.seq) FILTER (WHERE h.event_type IN ('activity_failed', 'sub_orchestration_failed',
                                                    'orchestration_failed')),
           min(h.seq) FILTER (WHERE h.event_type IN ('cancel_requested', 'orchestration_completed',
                                                    'orchestration_cancelled', 'orchestration_terminated',
                                                    'continued_as_new'))
    INTO last_seq, end_seq, first_failure, first_stop
    FROM history h WHERE h.instance_id = source_id AND h.execution_id = src_execution;
    SELECT h.payload INTO started FROM history h
    WHERE h.instance_id = source_id AND h.execution_id = src_execution AND h.seq = 1
      AND h.event_type = 'orchestration_started';
    IF started IS NULL THEN
        RAISE EXCEPTION 'pgdurable.fork: instance % has not started yet', source_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    cut := coalesce(cut, coalesce(first_failure, first_stop, last_seq + 1) - 1);
    IF cut < 1 OR cut >= coalesce(end_seq, last_seq + 1) THEN
        RAISE EXCEPTION 'pgdurable.fork: at_seq % is out of range: execution % of % has events 1..% before its end',
            cut, src_execution, source_id, coalesce(end_seq, last_seq + 1) - 1
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO instances (instance_id, name, status, input, custom_status, execution_id, history_len)
    VALUES (id, src_name, 'running', started -> 'input',
            (SELECT c.payload -> 'value' FROM history c
             WHERE c.instance_id = source_id AND c.execution_id = src_execution
               AND c.event_type = 'custom_status_set' AND c.seq <= cut
             ORDER BY c.seq DESC LIMIT 1),
            1, cut + 1)
    ON CONFLICT (instance_id) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgdurable.fork: instance % already exists', id USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO history (instance_id, execution_id, seq, event_type, payload, recorded_at)
    SELECT id, 1, h.seq, h.event_type, h.payload, h.recorded_at
    FROM history h
    WHERE h.instance_id = source_id AND h.execution_id = src_execution AND h.seq <= cut;
    -- The copied orchestration_started names the execution whose ctx.new_uuid() / ctx.random()
    -- stream the copy holds; a copy of an older history, whose start does not, gets it as 'seed'.
    INSERT INTO history (instance_id, execution_id, seq, event_type, payload)
    VALUES (id, 1, cut + 1, 'forked_from', jsonb_build_object('instance_id', source_id, 'at_seq', cut)
        || CASE WHEN started ? 'instance_id' THEN '{}'::jsonb ELSE jsonb_build_object(
               'seed', coalesce((SELECT f.payload ->> 'seed' FROM history f
                                 WHERE f.instance_id = source_id AND f.execution_id = src_execution
                                   AND f.event_type = 'forked_from'
                                 ORDER BY f.seq LIMIT 1),
                                source_id || '/' || src_execution)) END);
    INSERT INTO instance_values (instance_id, key, value, execution_id, seq)
    SELECT DISTINCT ON (h.payload ->> 'key') id, h.payload ->> 'key', h.payload -> 'value', 1, h.seq
    FROM history h
    WHERE h.instance_id = source_id AND h.execution_id = src_execution
      AND h.event_type = 'value_set' AND h.seq <= cut
    ORDER BY h.payload ->> 'key', h.seq DESC;
    INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
    VALUES (id, 1, src_name, 'resume', '{}');
    RETURN id;
END $$;
REVOKE ALL ON FUNCTION fork(text, integer, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION grant_client(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, role_name);
    EXECUTE format('GRANT SELECT ON %1$I.instances, %1$I.history, %1$I.registry, %1$I.schema_migrations, '
                   '%1$I.instance_values TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.start(text, jsonb, text), %1$I.send(text, text, jsonb), '
                   '%1$I.raise_event(text, text, jsonb), %1$I.cancel(text, text), '
                   '%1$I.fork(text, integer, text) TO %2$I', s, role_name);
END $$;

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
END $$;

-- Roles granted before this version: clients (SELECT on instances) and workers (INSERT too).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT pg_get_userbyid(a.grantee) AS role_name, a.privilege_type
             FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
             WHERE c.oid = 'instances'::regclass AND a.grantee <> 0 AND a.grantee <> c.relowner
               AND a.privilege_type IN ('SELECT', 'INSERT')
    LOOP
        IF r.privilege_type = 'INSERT' THEN
            PERFORM grant_worker(r.role_name);
        ELSE
            PERFORM grant_client(r.role_name);
        END IF;
    END LOOP;
END $$;
