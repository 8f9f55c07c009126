-- pgdurable_async least privilege, version 3.
-- Applied with search_path set to the pgdurable schema.  Three roles:
--   owner  - runs migrations (owns every object here);
--   worker - runs a Runtime: reads and writes the queues, appends history;
--   client - starts, queries and signals instances, through SECURITY DEFINER
--            functions only: it can neither write the tables nor read the queues.
-- The owner creates the login roles and calls grant_worker(role) / grant_client(role).

-- The client API runs with the owner's rights, so clients need no table privileges.
ALTER FUNCTION start(text, jsonb, text) SECURITY DEFINER;
ALTER FUNCTION send(text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION raise_event(text, text, jsonb) SECURITY DEFINER;
ALTER FUNCTION cancel(text, text) SECURITY DEFINER;
REVOKE ALL ON FUNCTION start(text, jsonb, text), send(text, text, jsonb),
    raise_event(text, text, jsonb), cancel(text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION grant_client(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, role_name);
    EXECUTE format('GRANT SELECT ON %1$I.instances, %1$I.history, %1$I.registry, %1$I.schema_migrations TO %2$I',
                   s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.start(text, jsonb, text), %1$I.send(text, text, jsonb), '
                   '%1$I.raise_event(text, text, jsonb), %1$I.cancel(text, text) TO %2$I', s, role_name);
END $$;

CREATE OR REPLACE FUNCTION grant_worker(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    PERFORM grant_client(role_name);  -- a worker's Runtime also has a client
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.instances, %1$I.orchestrator_queue, '
                   '%1$I.work_queue, %1$I.timers, %1$I.workers, %1$I.registry TO %2$I', s, role_name);
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.history TO %2$I', s, role_name);
END $$;

REVOKE ALL ON FUNCTION grant_client(text), grant_worker(text) FROM PUBLIC;
