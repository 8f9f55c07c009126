-- pgdurable_async: the current schema, in one file.
--
-- A SNAPSHOT for reading: the final state of migrations 0001..0013, each object defined
-- once, as the last migration left it, grouped by concern:
--   1. migration bookkeeping       5. client API (start, send, raise_event, cancel, fork)
--   2. tables                      6. roles and grants (grant_client, grant_worker)
--   3. history immutability        7. the df schema: pg_durable's SQL DSL surface
--   4. wake-up notifications          (nodes, operators, validation, variables, starting,
--                                      monitoring, node states, privileges)
--
-- It is not a migration: its name does not match the migrator's NNNN_name.sql pattern,
-- and databases are still built and upgraded only by `python -m pgdurable_async migrate`.
-- A schema change goes in a NEW numbered migration (never an edit of an applied one) AND
-- here; tests/integration/test_schema_snapshot.py builds one empty database with the
-- migrations, another with this file, and fails when their pg_dump --schema-only output
-- or their privileges differ.
--
-- To apply it (to an empty database: unlike the migrations it is not idempotent), do as
-- the migrator does with a migration: in one transaction, after
--     CREATE SCHEMA IF NOT EXISTS "<schema>";  SET LOCAL search_path = "<schema>";
-- Objects of the target schema are unqualified; `df` objects and the operators in
-- `public` are qualified.

-- Functions below capture this search_path (SET search_path FROM CURRENT); pg_temp goes
-- last so a caller's temporary table cannot stand in for ours in SECURITY DEFINER code.
-- (In the migrations this line opens 0002; a fresh install runs every migration in one
-- transaction, so it holds for everything created after it.)
SELECT set_config('search_path', current_setting('search_path') || ', pg_temp', true);


-- ======================================================================================
-- 1. Migration bookkeeping
-- The migrator creates this table itself, before it applies migration 0001, and adds one row
-- per migration applied (pgdurable_async/_migrate.py).  It is declared here with the same
-- definition so that this file shows the whole schema; the snapshot inserts no rows.
-- ======================================================================================

CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);


-- ======================================================================================
-- 2. Tables
-- ======================================================================================

-- Every orchestration instance, current state (history holds the facts).
CREATE TABLE instances (
    instance_id         text PRIMARY KEY,
    name                text NOT NULL,
    status              text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled', 'terminated')),
    input               jsonb,
    output              jsonb,
    error               jsonb,
    custom_status       jsonb,
    parent_instance_id  text,
    parent_execution_id integer,
    parent_task_id      integer,
    execution_id        integer NOT NULL DEFAULT 1,
    history_len         integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    submitted_by        oid,                -- graph instances: the role that submitted them (df.start)
    event_waits         jsonb               -- what history cannot say it waits on (events), after the last turn
);
CREATE INDEX instances_status_name ON instances (status, name);
CREATE INDEX instances_created ON instances (created_at DESC);
-- An instance's children: cascading cancel and terminate, purging children with their parent.
CREATE INDEX instances_parent ON instances (parent_instance_id) WHERE parent_instance_id IS NOT NULL;

-- Append-only event log, one row per fact.
CREATE TABLE history (
    instance_id  text NOT NULL,
    execution_id integer NOT NULL,
    seq          integer NOT NULL,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, execution_id, seq)
);
-- Recent history by time (the dashboard's throughput): appended in time order, so BRIN.
CREATE INDEX history_recorded_brin ON history USING brin (recorded_at);

-- Messages that drive turns: each row becomes one history event.
CREATE TABLE orchestrator_queue (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   text NOT NULL,
    execution_id  integer,              -- NULL: whatever execution is current
    orchestration text NOT NULL,        -- lets a runtime claim only what it can run
    kind          text NOT NULL,
    payload       jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orchestrator_queue_claim ON orchestrator_queue (orchestration, instance_id);
CREATE INDEX orchestrator_queue_instance ON orchestrator_queue (instance_id, id);

-- Activity work items.  visible_at is both the retry backoff and the lease expiry.
CREATE TABLE work_queue (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   text NOT NULL,
    execution_id  integer NOT NULL,
    task_id       integer NOT NULL,
    orchestration text NOT NULL,
    name          text NOT NULL,
    input         jsonb,
    retry         jsonb,
    attempt       integer NOT NULL DEFAULT 1,
    visible_at    timestamptz NOT NULL DEFAULT now(),
    lease_token   uuid,
    lease_owner   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (instance_id, execution_id, task_id)
);
-- Claims walk (name, id) and filter on visible_at, so the lease UPDATE (it changes only
-- visible_at, lease_token and lease_owner, none of them indexed) is a HOT update; the
-- fillfactor leaves each page the room those in-place updates need.
CREATE INDEX work_queue_fifo ON work_queue (name, id);
ALTER TABLE work_queue SET (fillfactor = 50);

-- Durable timers.
CREATE TABLE timers (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   text NOT NULL,
    execution_id  integer NOT NULL,
    task_id       integer NOT NULL,
    orchestration text NOT NULL,
    fire_at       timestamptz NOT NULL,
    UNIQUE (instance_id, execution_id, task_id)
);
CREATE INDEX timers_due ON timers (fire_at);

-- Names each runtime registers, so clients can reject unknown names.
CREATE TABLE registry (
    kind      text NOT NULL CHECK (kind IN ('orchestration', 'activity')),
    name      text NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, name)
);

-- Live workers and the backend of their LISTEN session (dead sessions free their leases).
-- A worker without a LISTEN session (wake="poll", behind a transaction pooler) has
-- backend_pid NULL and is alive while its heartbeat keeps expires_at in the future.
CREATE TABLE workers (
    worker_id     text PRIMARY KEY,
    backend_pid   integer,
    backend_start timestamptz,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz
);
COMMENT ON COLUMN workers.expires_at IS
    'wake="poll" workers (backend_pid NULL): dead once this has passed without a heartbeat';

-- Delivery keys of raise_event: an event is delivered at most once per key (see send()).
-- Keys live as long as their instance: purge removes them with it.  No foreign key, so a
-- delivery never waits for the row lock a turn holds on its instance.
CREATE TABLE event_deliveries (
    instance_id  text NOT NULL,
    delivery_key text NOT NULL,
    PRIMARY KEY (instance_id, delivery_key)
);


-- Named values an instance published (ctx.set_value); they outlive the instance until it is purged.
CREATE TABLE instance_values (
    instance_id  text NOT NULL,
    key          text NOT NULL,
    value        jsonb,
    execution_id integer NOT NULL,
    seq          integer NOT NULL,          -- the value_set event that wrote it
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, key)
);


-- ======================================================================================
-- 3. History immutability and purge
-- History is append-only: no UPDATE, no TRUNCATE, and a history row can be deleted only once
-- its instance row is gone; an instance row can be deleted only once the instance has
-- finished.  Purge (a worker's right) deletes a finished instance, then its history.
-- ======================================================================================

-- The statuses an instance never leaves (Python's twin: Status.is_terminal).
CREATE OR REPLACE FUNCTION is_finished(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT status IN ('completed', 'failed', 'cancelled', 'terminated')
$$;

CREATE OR REPLACE FUNCTION history_immutable() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'TRUNCATE') THEN
        RAISE EXCEPTION 'pgdurable history is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = OLD.instance_id) THEN
        RAISE EXCEPTION 'pgdurable history is append-only: instance % still exists (purge it)', OLD.instance_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
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

CREATE TRIGGER history_no_update BEFORE UPDATE OR DELETE ON history
    FOR EACH ROW EXECUTE FUNCTION history_immutable();
CREATE TRIGGER history_no_truncate BEFORE TRUNCATE ON history
    FOR EACH STATEMENT EXECUTE FUNCTION history_immutable();

CREATE TRIGGER instances_delete_guard BEFORE DELETE ON instances
    FOR EACH ROW EXECUTE FUNCTION instance_delete_guard();


-- ======================================================================================
-- 4. Wake-up notifications
-- NOTIFY on channels named after the schema, one per statement: <schema>_orch and
-- <schema>_work (new queue rows), <schema>_timer (payload: the earliest new fire_at, as epoch
-- seconds), <schema>_done (payload: the id of an instance that just finished) and <schema>_value
-- (payload: the id of an instance that set a durable value).
-- ======================================================================================

CREATE OR REPLACE FUNCTION notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_' || TG_ARGV[0], '');
    RETURN NULL;
END $$;

CREATE TRIGGER orchestrator_queue_notify AFTER INSERT ON orchestrator_queue
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('orch');
CREATE TRIGGER work_queue_notify AFTER INSERT ON work_queue
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('work');

CREATE OR REPLACE FUNCTION notify_timer() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    earliest timestamptz;
BEGIN
    SELECT min(fire_at) INTO earliest FROM new_rows;
    IF earliest IS NOT NULL THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_timer',
                          extract(epoch FROM earliest)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER timers_notify AFTER INSERT ON timers
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_timer();

-- Instance finished: wakes Client.wait / handle.result.
CREATE OR REPLACE FUNCTION notify_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_done', NEW.instance_id);
    RETURN NULL;
END $$;

CREATE TRIGGER instances_done_notify AFTER UPDATE OF status ON instances
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND is_finished(NEW.status))
    EXECUTE FUNCTION notify_done();

-- A value set: wakes Client.wait_value (payload: the instance id, once per instance and statement).
CREATE OR REPLACE FUNCTION notify_value() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_value', changed.instance_id)
    FROM (SELECT DISTINCT instance_id FROM new_rows) AS changed;
    RETURN NULL;
END $$;

CREATE TRIGGER instance_values_insert_notify AFTER INSERT ON instance_values
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_value();
CREATE TRIGGER instance_values_update_notify AFTER UPDATE ON instance_values
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_value();


-- ======================================================================================
-- 5. Client API
-- Start, signal and cancel instances from SQL.  These functions run with the owner's rights
-- (SECURITY DEFINER), so a client role needs no table privileges: only EXECUTE, which
-- grant_client() gives (PUBLIC has none).
-- ======================================================================================

-- An instance row and its start message, for many instances in one statement; returns the
-- ids created (a taken id is skipped).  start() and the turns' child starts use it.
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

-- Starting any registered orchestration from SQL (same transactional rule as df.start).
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

-- Queues a message for a live instance (a finished one ignores it).  An event whose payload
-- holds a delivery_key is delivered at most once per key: a client retrying raise_event
-- after a commit it could not confirm (the connection dropped during COMMIT) sends the
-- same key again, and that second delivery is a no-op.  The key is taken out of the
-- payload before queueing, so history records the event without it.
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

CREATE OR REPLACE FUNCTION raise_event(instance_id text, name text, data jsonb DEFAULT NULL) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT send(instance_id, 'event_received', jsonb_build_object('name', name, 'data', data));
$$;

CREATE OR REPLACE FUNCTION cancel(instance_id text, reason text DEFAULT NULL) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT send(instance_id, 'cancel_requested', jsonb_build_object('reason', reason));
$$;

REVOKE ALL ON FUNCTION start(text, jsonb, text), send(text, text, jsonb),
    raise_event(text, text, jsonb), cancel(text, text) FROM PUBLIC;

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


-- ======================================================================================
-- 6. Roles and grants
-- Least privilege, three roles:
--   owner  - runs migrations (owns every object here);
--   worker - runs a Runtime: reads and writes the queues, appends history, purges;
--   client - starts, queries and signals instances, through the client API only: it can
--            neither write the tables nor read the queues.
-- The owner creates the login roles and calls grant_worker(role) / grant_client(role).
-- ======================================================================================

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
-- A worker also purges, which removes an instance's delivery keys and values with it.
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

REVOKE ALL ON FUNCTION grant_client(text), grant_worker(text) FROM PUBLIC;


-- ======================================================================================
-- 7. The df schema: pg_durable's SQL DSL surface
-- Node functions build graph JSON (as text, so a plain SQL string in a node position is
-- auto-wrapped as a SQL node); df.start() records the instance in the caller's transaction;
-- the `pgdurable.graph` orchestration of any worker interprets it.  There is one `df` per
-- database (the migration serializes its creation with an advisory lock).
-- ======================================================================================

CREATE SCHEMA df;

-- --------------------------------------------------------------------------------------
-- 7.1 df: node construction
-- Node construction.  A node is graph JSON as text; text not starting with '{' is SQL.
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

CREATE OR REPLACE FUNCTION df._is_open(n jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT n->>'type' = 'if' AND coalesce((n->>'open')::boolean, false);
$$;

CREATE OR REPLACE FUNCTION df._steps(n jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN n->>'type' = 'seq' THEN n->'steps' ELSE jsonb_build_array(n) END;
$$;

CREATE OR REPLACE FUNCTION df.sql(query text) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    IF query IS NULL OR btrim(query) = '' THEN
        RAISE EXCEPTION 'df.sql: the query must not be empty';
    END IF;
    RETURN jsonb_build_object('type', 'sql', 'query', query)::text;
END $$;

-- ~> / df.seq.  `cond ?> a ~> b !> c`: an open `?>` takes what follows into its then-branch.
CREATE OR REPLACE FUNCTION df.seq(a text, b text) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    x jsonb := df._node(a);
    y jsonb := df._node(b);
BEGIN
    IF df._is_open(x) THEN
        RETURN jsonb_set(x, '{then}', df.seq((x->'then')::text, b)::jsonb)::text;
    END IF;
    RETURN jsonb_build_object('type', 'seq', 'steps', df._steps(x) || df._steps(y))::text;
END $$;

CREATE OR REPLACE FUNCTION df.seq(VARIADIC steps text[]) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    acc text;
    s text;
BEGIN
    IF steps IS NULL OR cardinality(steps) = 0 THEN
        RAISE EXCEPTION 'df.seq: needs at least one step';
    END IF;
    FOREACH s IN ARRAY steps LOOP
        acc := CASE WHEN acc IS NULL THEN df._node(s)::text ELSE df.seq(acc, s) END;
    END LOOP;
    RETURN acc;
END $$;

CREATE OR REPLACE FUNCTION df._pair(kind text, a text, b text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    x jsonb := df._node(a);
    y jsonb := df._node(b);
BEGIN
    IF df._is_open(x) THEN
        RETURN jsonb_set(x, '{then}', df._pair(kind, (x->'then')::text, b)::jsonb)::text;
    END IF;
    RETURN jsonb_build_object('type', kind, 'branches', jsonb_build_array(x, y))::text;
END $$;

CREATE OR REPLACE FUNCTION df.join(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT df._pair('join', a, b);
$$;

CREATE OR REPLACE FUNCTION df.join3(a text, b text, c text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT jsonb_build_object('type', 'join', 'branches',
                              jsonb_build_array(df._node(a), df._node(b), df._node(c)))::text;
$$;

CREATE OR REPLACE FUNCTION df.race(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT df._pair('race', a, b);
$$;

CREATE OR REPLACE FUNCTION df."as"(fut text, name text) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    x jsonb := df._node(fut);
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
        RAISE EXCEPTION 'df.as: % is not a valid result name (letters, digits, _)', coalesce(name, 'NULL');
    END IF;
    IF df._is_open(x) THEN
        RETURN jsonb_set(x, '{then}', df."as"((x->'then')::text, name)::jsonb)::text;
    END IF;
    RETURN jsonb_build_object('type', 'bind', 'name', name, 'node', x)::text;
END $$;

-- pg_durable's df.if / df.if_rows require else_branch (and are STRICT); ours also takes
-- two arguments (no else), so they stay non-strict with else_branch DEFAULT NULL.
CREATE OR REPLACE FUNCTION df."if"(condition text, then_branch text, else_branch text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'if', 'cond', df._node(condition), 'then', df._node(then_branch),
                              'else', CASE WHEN else_branch IS NULL THEN NULL ELSE df._node(else_branch) END)::text;
$$;

CREATE OR REPLACE FUNCTION df.if_rows(result_name text, then_branch text, else_branch text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'if_rows', 'name', result_name, 'then', df._node(then_branch),
                              'else', CASE WHEN else_branch IS NULL THEN NULL ELSE df._node(else_branch) END)::text;
$$;

-- ?> opens an if (its else still missing); !> closes it.
CREATE OR REPLACE FUNCTION df._then(condition text, then_node text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'if', 'cond', df._node(condition), 'then', df._node(then_node),
                              'else', NULL, 'open', true)::text;
$$;

CREATE OR REPLACE FUNCTION df._else(open_if text, else_node text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    x jsonb := df._node(open_if);
BEGIN
    IF NOT df._is_open(x) THEN
        RAISE EXCEPTION 'df: !> needs a condition opened with ?> on its left';
    END IF;
    RETURN (jsonb_set(x, '{else}', df._node(else_node)) - 'open')::text;
END $$;

CREATE OR REPLACE FUNCTION df.loop(body text, condition text DEFAULT NULL, continue_on_failure boolean DEFAULT false)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('type', 'loop', 'body', df._node(body),
                              'cond', CASE WHEN condition IS NULL THEN NULL ELSE df._node(condition) END,
                              'continue_on_failure', coalesce(continue_on_failure, false))::text;
$$;

CREATE OR REPLACE FUNCTION df._forever(body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT df.loop(body);
$$;

CREATE OR REPLACE FUNCTION df."break"(value text DEFAULT NULL) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v jsonb;
BEGIN
    IF value IS NOT NULL THEN
        BEGIN
            v := value::jsonb;
        EXCEPTION WHEN others THEN
            v := to_jsonb(value);
        END;
    END IF;
    RETURN jsonb_build_object('type', 'break', 'value', v)::text;
END $$;

CREATE OR REPLACE FUNCTION df.sleep(seconds double precision) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    IF seconds IS NULL OR NOT (seconds >= 0 AND seconds <= 3162240000) THEN  -- NaN is above every number
        RAISE EXCEPTION 'df.sleep: seconds must be from 0 to 3162240000 (100 years), not %', seconds;
    END IF;
    RETURN jsonb_build_object('type', 'sleep', 'seconds', seconds)::text;
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

CREATE OR REPLACE FUNCTION df.wait_for_schedule(cron_expr text) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    PERFORM df._check_cron(cron_expr);
    RETURN jsonb_build_object('type', 'wait_for_schedule', 'cron', btrim(cron_expr))::text;
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

-- A URL holding a {var} or $name placeholder is checked when the node runs, after
-- substitution (as pg_durable checks only URLs without '{').
CREATE OR REPLACE FUNCTION df.http(url text, method text DEFAULT 'POST', body text DEFAULT NULL,
                                   headers jsonb DEFAULT NULL, timeout_seconds integer DEFAULT 30) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF url IS NULL OR (url !~* '^https?://' AND url !~ '\{[A-Za-z_][A-Za-z0-9_]*\}|^\$[A-Za-z_]') THEN
        RAISE EXCEPTION 'df.http: % is not an http(s) URL', coalesce(url, 'NULL');
    END IF;
    IF upper(coalesce(method, 'POST')) NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD') THEN
        RAISE EXCEPTION 'df.http: unsupported method %', method;
    END IF;
    RETURN jsonb_build_object('type', 'http', 'url', url, 'method', upper(coalesce(method, 'POST')),
                              'body', body, 'headers', headers, 'timeout', coalesce(timeout_seconds, 30))::text;
END $$;

CREATE OR REPLACE FUNCTION df.call(name text, input jsonb DEFAULT NULL) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'df.call: name must be a registered orchestration or graph';
    END IF;
    RETURN jsonb_build_object('type', 'call', 'name', name, 'input', input)::text;
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

-- --------------------------------------------------------------------------------------
-- 7.2 df: operators
-- PostgreSQL gives every user-defined operator the same precedence, left-associative.
-- Each exists twice, in `df` and in `public` (so that pg_durable scripts run unchanged);
-- the migration creates each only when it is missing (and skips a missing `public`).
CREATE OPERATOR df.~>  (LEFTARG = text, RIGHTARG = text, FUNCTION = df.seq);
CREATE OPERATOR df.&   (LEFTARG = text, RIGHTARG = text, FUNCTION = df.join);
CREATE OPERATOR df.|   (LEFTARG = text, RIGHTARG = text, FUNCTION = df.race);
CREATE OPERATOR df.|=> (LEFTARG = text, RIGHTARG = text, FUNCTION = df.as);
CREATE OPERATOR df.?>  (LEFTARG = text, RIGHTARG = text, FUNCTION = df._then);
CREATE OPERATOR df.!>  (LEFTARG = text, RIGHTARG = text, FUNCTION = df._else);
CREATE OPERATOR df.@>  (RIGHTARG = text, FUNCTION = df._forever);

CREATE OPERATOR public.~>  (LEFTARG = text, RIGHTARG = text, FUNCTION = df.seq);
CREATE OPERATOR public.&   (LEFTARG = text, RIGHTARG = text, FUNCTION = df.join);
CREATE OPERATOR public.|   (LEFTARG = text, RIGHTARG = text, FUNCTION = df.race);
CREATE OPERATOR public.|=> (LEFTARG = text, RIGHTARG = text, FUNCTION = df.as);
CREATE OPERATOR public.?>  (LEFTARG = text, RIGHTARG = text, FUNCTION = df._then);
CREATE OPERATOR public.!>  (LEFTARG = text, RIGHTARG = text, FUNCTION = df._else);
CREATE OPERATOR public.@>  (RIGHTARG = text, FUNCTION = df._forever);

-- --------------------------------------------------------------------------------------
-- 7.3 df: validation at start
-- Validation at start: unknown node types, bad cron, references used before a bind.
-- $name references in SQL, found outside quotes, dollar-quoted bodies and comments, by
-- PostgreSQL's lexing rules.  The worker's Python tokenizer is its twin (it substitutes what
-- this validates); tests/integration/test_refs_parity.py holds both to one table of cases.
CREATE OR REPLACE FUNCTION df._refs(q text) RETURNS TABLE (name text, null_safe boolean)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i int := 1;
    n int := length(q);
    c text;
    esc boolean;
    depth int;
    j int;
    tag text;
    m text[];
BEGIN
    WHILE i <= n LOOP  -- i is always at the start of a token, never inside an identifier
        c := substr(q, i, 1);
        IF c = '''' OR (c IN ('e', 'E') AND substr(q, i + 1, 1) = '''') THEN
            esc := c <> '''';
            i := i + CASE WHEN esc THEN 2 ELSE 1 END;
            WHILE i <= n LOOP
                c := substr(q, i, 1);
                IF esc AND c = E'\\' THEN
                    i := i + 2;
                ELSIF c = '''' AND substr(q, i + 1, 1) = '''' THEN
                    i := i + 2;
                ELSIF c = '''' THEN
                    EXIT;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            i := i + 1;
        ELSIF c = '"' THEN
            i := i + 1;
            WHILE i <= n LOOP
                IF substr(q, i, 2) = '""' THEN
                    i := i + 2;
                ELSIF substr(q, i, 1) = '"' THEN
                    EXIT;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            i := i + 1;
        ELSIF substr(q, i, 2) = '--' THEN  -- up to the end of the line: \n or \r
            j := least(nullif(strpos(substr(q, i), E'\n'), 0), nullif(strpos(substr(q, i), E'\r'), 0));
            i := CASE WHEN j IS NULL THEN n + 1 ELSE i + j END;
        ELSIF substr(q, i, 2) = '/*' THEN
            depth := 0;
            WHILE i <= n LOOP
                IF substr(q, i, 2) = '/*' THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF substr(q, i, 2) = '*/' THEN
                    depth := depth - 1;
                    i := i + 2;
                    EXIT WHEN depth = 0;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF c = '$' THEN
            m := regexp_match(substr(q, i), '^\$((?:[A-Za-z_]|[^\x01-\x7F])(?:[A-Za-z0-9_]|[^\x01-\x7F])*)?\$');
            IF m IS NOT NULL THEN  -- a dollar quote (a tag, or none): skip its body
                tag := '$' || coalesce(m[1], '') || '$';
                j := strpos(substr(q, i + length(tag)), tag);
                i := CASE WHEN j = 0 THEN n + 1 ELSE i + 2 * length(tag) + j - 1 END;
            ELSE
                -- $name, $name?, $name.column, $name.column? or $name.*
                m := regexp_match(substr(q, i),
                                  '^(\$([A-Za-z_][A-Za-z0-9_]*)(?:\.\*|(?:\.[A-Za-z_][A-Za-z0-9_]*)?(\?)?))');
                IF m IS NOT NULL THEN
                    name := m[2];
                    null_safe := m[3] IS NOT NULL;
                    RETURN NEXT;
                    i := i + length(m[1]);
                ELSIF substr(q, i + 1, 1) ~ '^[0-9]$' THEN
                    RAISE EXCEPTION 'df.start: positional parameters like $1 are not allowed in %; use $name references',
                        quote_literal(left(q, 80));
                ELSE
                    i := i + 1;
                END IF;
            END IF;
        ELSIF c ~ '^[A-Za-z_]$' OR ascii(c) > 127 THEN  -- an identifier or keyword: any `$` in it is its own
            i := i + length((regexp_match(substr(q, i), '^(?:[A-Za-z0-9_$]|[^\x01-\x7F])+'))[1]);
        ELSE
            i := i + 1;
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION df._check_refs(refs text[], nullsafe boolean[], bound text[], what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    FOR k IN 1..coalesce(cardinality(refs), 0) LOOP
        IF NOT nullsafe[k] AND NOT (refs[k] = ANY (bound)) THEN
            RAISE EXCEPTION 'df.start: $% is used before it is bound on every path (bind it with |=> %) in %',
                refs[k], quote_literal(refs[k]), quote_literal(left(what, 80));
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION df._intersect(a text[], b text[]) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN a IS NULL THEN b ELSE ARRAY(SELECT unnest(a) INTERSECT SELECT unnest(b)) END;
$$;

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

-- --------------------------------------------------------------------------------------
-- 7.4 df: variables
-- Variables ({name} in SQL), per submitting role.  The role is quote_ident(current_user)::regrole:
-- a role name is not an identifier ("labUser", "Audit Quoted"), so it is quoted before the cast.
CREATE TABLE df.vars (
    name  text NOT NULL,
    value text,
    owner regrole NOT NULL DEFAULT quote_ident(current_user)::regrole,
    PRIMARY KEY (owner, name)
);
ALTER TABLE df.vars ENABLE ROW LEVEL SECURITY;
CREATE POLICY vars_user_isolation ON df.vars FOR ALL
    USING (owner::oid = quote_ident(current_user)::regrole::oid)
    WITH CHECK (owner::oid = quote_ident(current_user)::regrole::oid);

CREATE OR REPLACE FUNCTION df.setvar(name text, value text) RETURNS text LANGUAGE sql STRICT AS $$
    INSERT INTO df.vars (name, value, owner) VALUES (setvar.name, setvar.value, quote_ident(current_user)::regrole)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value;
    SELECT 'OK';
$$;

CREATE OR REPLACE FUNCTION df.getvar(name text) RETURNS text LANGUAGE sql STRICT AS $$
    SELECT v.value FROM df.vars v WHERE v.name = getvar.name AND v.owner = quote_ident(current_user)::regrole;
$$;

CREATE OR REPLACE FUNCTION df.unsetvar(name text) RETURNS text LANGUAGE sql STRICT AS $$
    DELETE FROM df.vars v WHERE v.name = unsetvar.name AND v.owner = quote_ident(current_user)::regrole;
    SELECT 'OK';
$$;

CREATE OR REPLACE FUNCTION df.clearvars() RETURNS text LANGUAGE sql AS $$
    DELETE FROM df.vars v WHERE v.owner = quote_ident(current_user)::regrole;
    SELECT 'OK';
$$;

-- --------------------------------------------------------------------------------------
-- 7.5 df: starting
-- The one way a graph instance is created: df.start runs as the caller and hands the
-- graph to df._submit, which files a df._requests row as the calling role (current_user).
-- df._requests: the caller INSERTs a request as itself (the default records current_user, and
-- row-level security refuses any other); a definer trigger checks and carries it out (creates
-- the instance, or queues a signal or cancel); another removes the row.
CREATE TABLE df._requests (
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


CREATE TRIGGER requests_accept BEFORE INSERT ON df._requests FOR EACH ROW EXECUTE FUNCTION df._request_accept();

CREATE TRIGGER requests_done AFTER INSERT ON df._requests FOR EACH ROW EXECUTE FUNCTION df._request_done();

CREATE OR REPLACE FUNCTION df._submit(graph jsonb, label text DEFAULT NULL, search_path text DEFAULT NULL,
                                      vars jsonb DEFAULT NULL, instance_id text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    INSERT INTO df._requests (kind, graph, label, search_path, vars, instance_id)
    VALUES ('start', graph, label, search_path, vars, instance_id)
    RETURNING instance_id;
$$;

CREATE OR REPLACE FUNCTION df._start_new(fut text, label text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    ext_schema text;
    host text;
    conn text;
    id text;
BEGIN
    SELECT n.nspname INTO ext_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'dblink';
    IF ext_schema IS NULL THEN
        RAISE EXCEPTION 'df.start(transaction_mode => ''new'') needs the dblink extension: CREATE EXTENSION dblink'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    host := coalesce(host(inet_server_addr()),
                     nullif(btrim(split_part(current_setting('unix_socket_directories'), ',', 1)), ''));
    conn := format('dbname=%s user=%s port=%s', quote_literal(current_database()), quote_literal(session_user),
                   current_setting('port'));
    IF host IS NOT NULL THEN
        conn := conn || format(' host=%s', quote_literal(host));
    END IF;
    EXECUTE format('SELECT t.id FROM %I.dblink($1, $2) AS t(id text)', ext_schema)
        INTO id
        USING conn, format('SET ROLE %I; SELECT df.start(%L, %L)', current_user, fut, label);
    RETURN id;
END $$;

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

-- --------------------------------------------------------------------------------------
-- 7.6 df: monitoring, signals and cancellation
-- Monitoring: instances started with df.start, visible to the roles that may act as
-- their submitter (superusers see all).  pg_durable's columns first, then ours.
-- Everything that reads instance state is VOLATILE: `SELECT df.await_instance(id, 30),
-- df.status(id)` must see the state await_instance waited for, not the statement's snapshot.
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

-- Cooperative: the instance gets a cancel request and its worker stops it (status
-- 'cancelled' once the worker has processed it; df.await_instance waits for that).
CREATE OR REPLACE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user') RETURNS text
LANGUAGE plpgsql STRICT AS $$
BEGIN
    PERFORM df._request('cancel_requested', instance_id, jsonb_build_object('reason', reason));
    RETURN format('Instance %s cancelled: %s', instance_id, reason);
END $$;

CREATE OR REPLACE FUNCTION df.status(instance_id text) RETURNS text LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.status FROM df.instances i WHERE i.id = status.instance_id;
$$;

-- The root node's result (the instance's output) as text, as in pg_durable.
CREATE OR REPLACE FUNCTION df.result(instance_id text) RETURNS text LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.output::text FROM df.instances i WHERE i.id = result.instance_id AND i.status = 'completed';
$$;

-- pg_durable's page-size guard (its pg_durable.list_instances_max_limit GUC, at its default).
CREATE OR REPLACE FUNCTION df._check_limit(limit_count integer) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF limit_count IS NULL OR limit_count < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1';
    END IF;
    IF limit_count > 1000 THEN
        RAISE EXCEPTION 'df.list_instances: limit_count (%) exceeds pg_durable.list_instances_max_limit (1000); '
            'request fewer rows, or use the paginated df.list_instances overload (after_cursor/next_cursor) '
            'for large result sets', limit_count;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION df.list_instances(status_filter text DEFAULT NULL, limit_count integer DEFAULT 100)
RETURNS TABLE (instance_id text, label text, function_name text, status text, execution_count bigint, output text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM df._check_limit(limit_count);
    RETURN QUERY
    SELECT i.id::text, i.label, i.function_name, i.status, i.execution_count, i.output::text
    FROM df.instances i
    WHERE status_filter IS NULL OR i.status = status_filter
    ORDER BY i.created_at DESC, i.id
    LIMIT limit_count;
END $$;

-- Polls (inside SQL a LISTEN cannot be consumed); needs READ COMMITTED to see progress.
-- timeout_seconds is an integer in pg_durable; a double here also takes fractions.
CREATE OR REPLACE FUNCTION df.await_instance(instance_id text, timeout_seconds double precision DEFAULT 30)
RETURNS text LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    deadline timestamptz;
    st text;
    pause double precision := 0.02;
BEGIN
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

-- --------------------------------------------------------------------------------------
-- 7.7 df: node states
-- Nodes of an instance's graph with their states.  SQL and HTTP nodes have a physical
-- state read from the history (activity events carry the node id); other nodes are
-- derived from their children and siblings (`python -m pgdurable_async graph ID`
-- computes exact states for every node by replaying the history).
CREATE OR REPLACE FUNCTION df._graph_nodes(graph jsonb)
RETURNS TABLE (node_id text, parent_id text, depth int, pos int, node jsonb)
LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE walk(node_id, parent_id, depth, pos, node) AS (
        SELECT 'n0'::text, NULL::text, 0, 0, graph
        UNION ALL
        SELECT w.node_id || '.' || c.idx, w.node_id, w.depth + 1, c.idx, c.child
        FROM walk w
        CROSS JOIN LATERAL (
            SELECT (e.ord - 1)::int AS idx, e.value AS child
            FROM jsonb_array_elements(CASE WHEN w.node->>'type' = 'seq' THEN w.node->'steps'
                                           WHEN w.node->>'type' IN ('join', 'race') THEN w.node->'branches'
                                           ELSE '[]'::jsonb END) WITH ORDINALITY AS e(value, ord)
            UNION ALL
            SELECT f.idx, w.node->f.field
            FROM (VALUES ('bind', 'node', 0), ('if', 'cond', 0), ('if', 'then', 1), ('if', 'else', 2),
                         ('if_rows', 'cond', 0), ('if_rows', 'then', 1), ('if_rows', 'else', 2),
                         ('loop', 'body', 0), ('loop', 'cond', 1), ('fan_out', 'step', 0)) AS f(kind, field, idx)
            WHERE f.kind = w.node->>'type' AND jsonb_typeof(w.node->f.field) = 'object'
        ) c
    )
    SELECT * FROM walk;
$$;

-- df._instance_nodes adds the failed nodes' error message for df.nodes.
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

CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text, right_node text,
               status text, result text, status_details text, inferred_status text,
               inferred_status_from_ancestor_id text, updated_at timestamptz)
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT n.node_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status, n.result,
           n.status_details, n.inferred_status, n.inferred_status_from_ancestor_id, n.updated_at
    FROM df._instance_nodes(instance_id_param) n;
$$;

-- Every node of every visible instance (computed per instance), pg_durable's columns first.
-- Node ids are paths in the graph (n0, n0.1, ...), not pg_durable's 8-hex row ids.
CREATE OR REPLACE VIEW df.nodes AS
SELECT n.node_id::text AS id, i.id AS instance_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
       n.status, n.result::jsonb AS result, n.error, i.submitted_by, i.database, i.created_at, n.updated_at,
       n.status_details::jsonb AS status_details, n.inferred_status, n.inferred_status_from_ancestor_id
FROM df.instances i
CROSS JOIN LATERAL df._instance_nodes(i.id) n;

-- --------------------------------------------------------------------------------------
-- 7.8 df: more monitoring
-- More monitoring: one instance, its executions, a paginated listing, system-wide counts,
-- a text explain.
CREATE OR REPLACE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.id::text, i.label, i.function_name, '1.0.0'::text, i.execution_count, i.status, i.output::text
    FROM df.instances i WHERE i.id = instance_info.instance_id;
$$;

-- One row per execution (a loop that continues as new starts another), newest first;
-- status in duroxide's words as in pg_durable: Running, Completed, Failed, ContinuedAsNew.
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
    SELECT x.id::text, x.label, x.function_name, x.status, x.execution_count, x.output::text, x.created_at,
           x.completed_at,
           (SELECT CASE WHEN x.total > limit_count
                        THEN encode(convert_to(l.created_at::text || '|' || l.id, 'UTF8'), 'hex') END
            FROM numbered l WHERE l.n = limit_count)
    FROM numbered x WHERE x.n <= limit_count
    ORDER BY x.n;
END $$;

-- System-wide counts over every instance of this pgdurable schema (graphs, their
-- sub-workflows and code orchestrations): only for roles granted it explicitly.
CREATE OR REPLACE FUNCTION df.metrics()
RETURNS TABLE (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT count(*),
           count(*) FILTER (WHERE i.status IN ('pending', 'running')),
           count(*) FILTER (WHERE i.status = 'completed'),
           count(*) FILTER (WHERE i.status IN ('failed', 'cancelled', 'terminated')),
           coalesce(sum(i.execution_id), 0)::bigint,
           (SELECT count(*) FROM history)
    FROM instances i;
$$;
REVOKE EXECUTE ON FUNCTION df.metrics() FROM PUBLIC;

-- An indented outline of an instance (an 8-hex id), of a graph (node JSON or a plain SQL
-- statement), or of a DSL expression given as text, which is evaluated as the caller.
CREATE OR REPLACE FUNCTION df.explain(input text) RETURNS text LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    out text := '';
    expr text := btrim(input);
    graph jsonb;
    r record;
BEGIN
    IF expr ~* '^[0-9a-f]{8}$' THEN
        IF df.status(expr) IS NULL THEN
            RETURN format('Instance ''%s'' not found', expr);
        END IF;
        FOR r IN SELECT * FROM df.instance_nodes(expr) LOOP
            out := out || repeat('  ', length(r.node_id) - length(replace(r.node_id, '.', ''))) || r.node_type
                || coalesce(' ' || left(regexp_replace(r.query, '\s+', ' ', 'g'), 60), '')
                || '  [' || r.inferred_status || ']' || E'\n';
        END LOOP;
        RETURN out;
    END IF;
    IF left(expr, 1) <> '{'
       AND expr !~* '^(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|CALL|DO|TRUNCATE|GRANT|REVOKE|EXPLAIN|VALUES|TABLE)\s'
       AND expr ~ '(~>|\|=>|\?>|!>|@>|df\.)' THEN
        EXECUTE format('SELECT (%s)::text', expr) INTO expr;
        IF expr IS NULL THEN
            RETURN 'Expression returned NULL';
        END IF;
    END IF;
    graph := df._node(expr);
    FOR r IN SELECT * FROM df._graph_nodes(graph) g ORDER BY g.node_id LOOP
        out := out || repeat('  ', r.depth) || upper(r.node->>'type')
            || coalesce(' ' || left(regexp_replace(r.node->>'query', '\s+', ' ', 'g'), 60), '')
            || coalesce(' as ' || CASE WHEN r.node->>'type' = 'bind' THEN r.node->>'name' END, '') || E'\n';
    END LOOP;
    RETURN out;
END $$;

-- --------------------------------------------------------------------------------------
-- 7.9 df: privileges
-- Privileges.  Nothing in `df` is usable without USAGE on the schema, which
-- df.grant_usage gives.  df.http needs include_http; the worker's login role must be a
-- member of each submitting role (GRANT app_role TO worker_role) to run its SQL as it.
REVOKE ALL ON SCHEMA df FROM PUBLIC;

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
