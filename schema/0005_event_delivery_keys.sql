-- pgdurable_async, version 5: events delivered at most once per delivery key.
-- A client retrying raise_event after a commit it could not confirm (the connection
-- dropped during COMMIT) sends the same key again; the second delivery is a no-op.
-- Keys live as long as their instance: purge removes them with it.  No foreign key, so
-- a delivery never waits for the row lock a turn holds on its instance.
CREATE TABLE IF NOT EXISTS event_deliveries (
    instance_id  text NOT NULL,
    delivery_key text NOT NULL,
    PRIMARY KEY (instance_id, delivery_key)
);

-- Same signature as version 2 (grants are kept).  The key travels in the payload and is
-- taken out of it before queueing, so history records the event as before.
CREATE OR REPLACE FUNCTION send(instance_id text, kind text, payload jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    st text;
BEGIN
    SELECT i.status INTO st FROM instances i WHERE i.instance_id = send.instance_id;
    IF st IS NULL THEN
        RAISE EXCEPTION 'instance % not found', send.instance_id USING ERRCODE = 'no_data_found';
    END IF;
    IF st NOT IN ('pending', 'running') THEN
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

-- Purge (a worker's right) removes an instance's keys with it.
CREATE OR REPLACE FUNCTION grant_worker(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    PERFORM grant_client(role_name);  -- a worker's Runtime also has a client
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.instances, %1$I.orchestrator_queue, '
                   '%1$I.work_queue, %1$I.timers, %1$I.workers, %1$I.registry TO %2$I', s, role_name);
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.history TO %2$I', s, role_name);
    EXECUTE format('GRANT SELECT, DELETE ON %1$I.event_deliveries TO %2$I', s, role_name);
END $$;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT grantee FROM information_schema.role_table_grants
             WHERE table_schema = current_schema() AND table_name = 'instances'
               AND privilege_type = 'DELETE' AND grantee <> current_user
    LOOP
        EXECUTE format('GRANT SELECT, DELETE ON event_deliveries TO %I', r.grantee);
    END LOOP;
END $$;
