-- pgdurable_async: the current schema, in one file.
--
-- A SNAPSHOT for reading: the final state of migrations 0001..0019, each object defined
-- once, as the last migration left it, grouped by concern:
--   1. migration bookkeeping       5. client API (start, send, raise_event, cancel, fork)
--   2. tables                      6. roles and grants (grant_client, grant_worker)
--   3. history immutability        7. the df schema: pg_durable's SQL DSL surface
--   4. wake-up notifications          (nodes, operators, validation, variables, starting,
--                                      monitoring, node states, privileges)
--                                   8. flow control (claims of limited queues), schedules
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
    event_waits         jsonb,              -- what history cannot say it waits on (events), after the last turn
    trace_context       jsonb               -- the W3C trace context of the client.start that created it
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
    queue         text,                      -- its pgd.Queue (NULL: no limits)
    key           text,                      -- what key_concurrency counts (ctx.call_activity key=)
    priority      integer NOT NULL DEFAULT 0,  -- in a queue: higher first among ready items, FIFO within one
    lease_queue   text,                      -- the queue, while a limited claim's lease is held
    UNIQUE (instance_id, execution_id, task_id)
);
-- Claims of items without a queue walk (name, id) and filter on visible_at, so the lease UPDATE
-- (it changes only visible_at, lease_token and lease_owner, none of them indexed) is a HOT update;
-- the fillfactor leaves each page the room those in-place updates need.  Claims of limited queues
-- (claim_queued) walk (queue, priority, id) or (queue, key, ...), and count leases through
-- lease_queue, which only they set.
CREATE INDEX work_queue_fifo ON work_queue (name, id);
CREATE INDEX work_queue_queued ON work_queue (queue, priority DESC, id) WHERE queue IS NOT NULL;
CREATE INDEX work_queue_keyed ON work_queue (queue, key, priority DESC, id)
    WHERE queue IS NOT NULL AND key IS NOT NULL;
CREATE INDEX work_queue_leased ON work_queue (lease_queue, key) WHERE lease_queue IS NOT NULL;
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
    queue     text,                 -- activities: the queue they run under
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
    expires_at    timestamptz,
    running_since timestamptz   -- its longest-running activity started then (NULL: none running)
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

-- Queues' limits (upserted by each runtime at start); claim_queued enforces them.
CREATE TABLE queues (
    name            text PRIMARY KEY,
    concurrency     integer CHECK (concurrency >= 1),
    rate_limit      integer CHECK (rate_limit >= 1),
    rate_per        interval CHECK (rate_per > interval '0'),
    key_concurrency integer CHECK (key_concurrency >= 1),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_limit IS NULL) = (rate_per IS NULL))
);

-- Recent starts of rate-limited queues (the sliding window; older rows are deleted by claims).
CREATE TABLE queue_starts (
    queue      text NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX queue_starts_window ON queue_starts (queue, started_at);

-- Cron and interval schedules; runtimes fire them (see schedule_instance_id).
CREATE TABLE schedules (
    schedule_id      text PRIMARY KEY,
    orchestration    text NOT NULL,
    input            jsonb NOT NULL DEFAULT 'null',
    cron             text,
    every            interval CHECK (every >= interval '1 second'),
    timezone         text NOT NULL DEFAULT 'UTC',
    overlap          text NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'allow')),
    catchup          text NOT NULL DEFAULT 'latest' CHECK (catchup IN ('latest', 'all', 'none')),
    paused           boolean NOT NULL DEFAULT false,
    next_fire_at     timestamptz NOT NULL,
    last_instance_id text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every IS NULL))
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE NOT paused;


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
-- <schema>_work (new queue rows; also acks of queued items), <schema>_schedule (schedules
-- changed), <schema>_timer (payload: the earliest new fire_at, as epoch seconds), <schema>_done
-- (payload: the id of an instance that just finished) and <schema>_value (payload: the id of an
-- instance that set a durable value).
-- ======================================================================================

-- Silent in a transaction that set pgdurable.notify to 'deferred': the runtime's turns, acks
-- and client starts NOTIFY after their commit instead, asynchronously committed (0018).
CREATE OR REPLACE FUNCTION notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pgdurable.notify', true) IS DISTINCT FROM 'deferred' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_' || TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER orchestrator_queue_notify AFTER INSERT ON orchestrator_queue
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('orch');
CREATE TRIGGER work_queue_notify AFTER INSERT ON work_queue
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('work');
CREATE TRIGGER schedules_notify AFTER INSERT OR UPDATE OR DELETE ON schedules
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('schedule');

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
-- plpgsql (0018): its plan is kept for the session.
CREATE OR REPLACE FUNCTION create_instances(ids text[], names text[], inputs jsonb[], parents text[],
                                            parent_executions integer[], parent_tasks integer[])
RETURNS SETOF text LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RETURN QUERY
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
    RETURNING instance_id;
END $$;
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

-- start() that also records the caller's W3C trace context, so the instance's spans join the
-- caller's trace in any worker process.
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
                   '%1$I.instance_values, %1$I.schedules TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.start(text, jsonb, text), %1$I.send(text, text, jsonb), '
                   '%1$I.raise_event(text, text, jsonb), %1$I.cancel(text, text), '
                   '%1$I.fork(text, integer, text), %1$I.start(text, jsonb, text, jsonb) TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   '%1$I.create_schedule(text, text, jsonb, text, interval, text, text, text, timestamptz), '
                   '%1$I.set_schedule_paused(text, boolean, timestamptz), %1$I.delete_schedule(text), '
                   '%1$I.trigger_schedule(text) TO %2$I', s, role_name);
END $$;

-- A worker also purges (an instance's delivery keys and values go with it), runs the df
-- retention pass, fires schedules (creating instances) and claims queued work.
CREATE OR REPLACE FUNCTION grant_worker(role_name text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    s text := current_schema();
BEGIN
    PERFORM grant_client(role_name);  -- a worker's Runtime also has a client
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.instances, %1$I.orchestrator_queue, '
                   '%1$I.work_queue, %1$I.timers, %1$I.workers, %1$I.registry, %1$I.instance_values, '
                   '%1$I.queues, %1$I.queue_starts, %1$I.schedules TO %2$I', s, role_name);
    EXECUTE format('GRANT SELECT, INSERT ON %1$I.history TO %2$I', s, role_name);
    EXECUTE format('GRANT SELECT, DELETE ON %1$I.event_deliveries TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION df._expire(integer, integer, integer) TO %I', role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.create_instances(text[], text[], jsonb[], text[], integer[], '
                   'integer[]) TO %2$I', s, role_name);
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
END $$;-- Node construction: pg_durable's JSON is translated; a named result sits on the node
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

CREATE OR REPLACE FUNCTION df._is_open(n jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT n->>'type' = 'if' AND coalesce((n->>'open')::boolean, false);
$$;

CREATE OR REPLACE FUNCTION df._steps(n jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN n->>'type' = 'seq' AND NOT n ? 'result_name' THEN n->'steps' ELSE jsonb_build_array(n) END;
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

-- A graph as the worker reads it: a JSON string in a node position is a SQL node (as in
-- pgdurable_async/_graph/compiler.py); df._check then checks every node's fields.
-- Validation at start
-- Depth as pg_durable counts it: a sequence of n steps is the chain of n - 1 binary `~>` nodes
-- it is written with, so the same graphs are accepted (and refused past 256 levels).
-- (jit is off here and in df._node_rows: a recursive query is costed high, and compiling it
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
-- What a graph may hold when a role submits it: HTTP nodes only with the df.http grant,
-- activity nodes only with the df.call_activity grant, and no built-in (pgdurable.*) names.

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

-- Variables: not from inside a workflow (pg_durable captures them at df.start).
CREATE OR REPLACE FUNCTION df.setvar(name text, value text) RETURNS text LANGUAGE plpgsql STRICT AS $$
#variable_conflict use_column
BEGIN
    PERFORM df._refuse_in_workflow('df.setvar()');
    INSERT INTO df.vars (name, value, owner) VALUES (setvar.name, setvar.value, quote_ident(current_user)::regrole)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value;
    RETURN 'OK';
END $$;

CREATE OR REPLACE FUNCTION df.getvar(name text) RETURNS text LANGUAGE sql STRICT AS $$
    SELECT v.value FROM df.vars v WHERE v.name = getvar.name AND v.owner = quote_ident(current_user)::regrole;
$$;

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

CREATE OR REPLACE FUNCTION df._start_doc(r df._requests) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('graph', r.graph, 'vars', coalesce(r.vars, '{}'), 'search_path', r.search_path,
                              'label', r.label);
$$;

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
CREATE OR REPLACE FUNCTION df._submit(graph jsonb, label text DEFAULT NULL, search_path text DEFAULT NULL,
                                      vars jsonb DEFAULT NULL, instance_id text DEFAULT NULL,
                                      transaction_mode text DEFAULT 'caller') RETURNS text
LANGUAGE sql VOLATILE AS $$
    INSERT INTO df._requests (kind, graph, label, search_path, vars, instance_id, payload)
    VALUES ('start', graph, label, search_path, vars, instance_id,
            CASE WHEN transaction_mode = 'new' THEN '{"transaction_mode": "new"}'::jsonb END)
    RETURNING instance_id;
$$;


CREATE TRIGGER requests_accept BEFORE INSERT ON df._requests FOR EACH ROW EXECUTE FUNCTION df._request_accept();

CREATE TRIGGER requests_done AFTER INSERT ON df._requests FOR EACH ROW EXECUTE FUNCTION df._request_done();

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

-- --------------------------------------------------------------------------------------
-- 7.6 df: monitoring, signals and cancellation
-- The first 8 hex digits of md5(<instance id>:<path>).
CREATE OR REPLACE FUNCTION df._node_key(instance_id text, path text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT left(md5(instance_id || ':' || path), 8);
$$;


-- Monitoring.  An instance whose submitting role was dropped stays listed (its submitted_by shows
-- the role's number), visible to superusers.
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

-- On a finished instance nothing changes, and the text says so (0017).
CREATE OR REPLACE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user') RETURNS text
LANGUAGE plpgsql STRICT AS $$
DECLARE
    before text := df.status(instance_id);  -- NULL when unknown or not visible: df._request raises
BEGIN
    IF before IN ('completed', 'failed', 'cancelled', 'terminated') THEN
        RETURN format('Instance %s already %s: nothing to cancel', instance_id, before);
    END IF;
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

-- Every node path of an instance's graph mapped to its 8-hex id (see the header for collisions).
CREATE OR REPLACE FUNCTION df._node_ids(instance_id text, graph jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(k.node_id, CASE WHEN k.rank = 1 THEN k.key
                                                     ELSE df._node_key(instance_id, k.node_id || '#' || k.rank) END),
                    '{}'::jsonb)
    FROM (SELECT g.node_id, h.key, row_number() OVER (PARTITION BY h.key ORDER BY g.node_id) AS rank
          FROM df._graph_nodes(graph) g CROSS JOIN LATERAL (SELECT df._node_key(instance_id, g.node_id) AS key) h) k;
$$;

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

-- status_details->>'execution_id' is pg_durable's lineage stamp: the instance id and the node's
-- execution, then `::<node id>::<generation>` per scope around the node (a JOIN or RACE branch,
-- a loop off the root spine; the loop and its body share its scope; a loop's generation is its
-- iteration from 1, a branch's 1).  Nodes are named by 8-hex ids (df._node_ids), each row's graph
-- path last: df.instance_nodes and df.nodes show the ids, df.explain reads states by path.
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

-- --------------------------------------------------------------------------------------
-- 7.8 df: more monitoring
-- What the monitoring functions show as an instance's output: its result, or its error message.
CREATE OR REPLACE FUNCTION df._output(status text, output jsonb, error jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN status = 'failed' THEN coalesce(error->>'message', error::text) ELSE output::text END;
$$;CREATE OR REPLACE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.id::text, i.label, i.function_name, '1.0.0'::text, i.execution_count, i.status,
           df._output(i.status, i.output, i.error)
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
    SELECT x.id::text, x.label, x.function_name, x.status, x.execution_count, df._output(x.status, x.output, x.error),
           x.created_at, x.completed_at,
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

-- --------------------------------------------------------------------------------------
-- 7.9 df: privileges
-- Privileges.  Nothing in `df` is usable without USAGE on the schema, which
-- df.grant_usage gives.  df.http needs include_http; the worker's login role must be a
-- member of each submitting role (GRANT app_role TO worker_role) to run its SQL as it.
REVOKE ALL ON SCHEMA df FROM PUBLIC;

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

-- Beyond pg_durable: activity nodes from SQL need this on top of df.grant_usage.
CREATE OR REPLACE FUNCTION df.grant_activities(p_role text, with_grant boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT EXECUTE ON FUNCTION df.call_activity(text, jsonb) TO %I%s', p_role,
                   CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END);
END $$;

REVOKE EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean), df.revoke_usage(text),
    df.grant_activities(text, boolean), df.http(text, text, text, jsonb, integer) FROM PUBLIC;


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
-- ======================================================================================
-- 8. Flow control and schedules
-- claim_queued: the claim of limited queues; claim_work: the claim of items without a queue.  Schedules: the instance id of a firing, and the client API
-- (SECURITY DEFINER, like section 5).
-- ======================================================================================

-- Lease up to max_items ready items of the limited queues queue_names (activities activity_names
-- only), within each queue's limits.  Rows come highest priority first, FIFO within one.  When
-- fewer than max_items are claimed, a last row with a NULL id carries wake_in: the seconds until
-- one of these queues may give more by the clock (a rate window slides, a retry backoff ends),
-- or NULL when only a finished item can free a slot (acks of queued items NOTIFY <schema>_work).
CREATE OR REPLACE FUNCTION claim_queued(queue_names text[], activity_names text[], max_items integer,
                                        lease_seconds double precision, owner_id text)
RETURNS TABLE (id bigint, instance_id text, execution_id integer, task_id integer, name text, input jsonb,
               retry jsonb, attempt integer, lease_token uuid, queue text, wake_in double precision)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    cfg queues;
    t timestamptz;
    want integer;
    allowed integer;
    got integer;
    total integer := 0;
    started integer;
    oldest timestamptz;
    span interval;
    hint double precision;
    due double precision;
BEGIN
    FOR cfg IN SELECT * FROM queues q WHERE q.name = ANY (queue_names) ORDER BY q.name FOR NO KEY UPDATE OF q LOOP
        want := max_items - total;
        EXIT WHEN want <= 0;
        -- Read after the lock: every start and lease of an earlier claim of this queue is visible
        -- and older (this clock moves on across transactions, unlike now()).
        t := clock_timestamp();
        allowed := want;
        IF cfg.concurrency IS NOT NULL THEN
            allowed := least(allowed, cfg.concurrency - (SELECT count(*) FROM work_queue w
                                                          WHERE w.lease_queue = cfg.name AND w.visible_at > t)::integer);
        END IF;
        started := 0;
        oldest := NULL;
        IF cfg.rate_limit IS NOT NULL THEN
            -- The window is widened by min(50 ms, rate_per / 10): a start is counted from its claim,
            -- and an item that begins to run a little after its claim still falls inside it.
            span := cfg.rate_per + least(interval '50 milliseconds', cfg.rate_per / 10);
            DELETE FROM queue_starts s WHERE s.queue = cfg.name AND s.started_at <= t - span;
            SELECT count(*)::integer, min(s.started_at) INTO started, oldest FROM queue_starts s WHERE s.queue = cfg.name;
            allowed := least(allowed, cfg.rate_limit - started);
        END IF;
        got := 0;
        IF allowed > 0 AND cfg.key_concurrency IS NULL THEN
            RETURN QUERY
            WITH picked AS (
                SELECT w.id FROM work_queue w
                WHERE w.queue = cfg.name AND w.name = ANY (activity_names) AND w.visible_at <= t
                ORDER BY w.priority DESC, w.id
                LIMIT allowed
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE work_queue w
                SET visible_at = t + make_interval(secs => lease_seconds), lease_token = gen_random_uuid(),
                    lease_owner = owner_id, lease_queue = cfg.name
                FROM picked p WHERE w.id = p.id
                RETURNING w.id, w.instance_id, w.execution_id, w.task_id, w.name, w.input, w.retry, w.attempt,
                          w.lease_token, w.queue
            )
            SELECT c.*, NULL::double precision FROM claimed c;
            GET DIAGNOSTICS got = ROW_COUNT;
        ELSIF allowed > 0 THEN
            -- Per key: the distinct keys (a skip scan of work_queue_keyed), the room each has left,
            -- then that many of its best items; items without a key count against the queue only.
            -- Candidates are read without locks (this claim holds the queue's lock: no other claim
            -- takes them); only the best `allowed` of them are locked and leased.
            RETURN QUERY
            WITH RECURSIVE keys AS (
                (SELECT w.key FROM work_queue w WHERE w.queue = cfg.name AND w.key IS NOT NULL ORDER BY w.key LIMIT 1)
                UNION ALL
                SELECT (SELECT w.key FROM work_queue w WHERE w.queue = cfg.name AND w.key > k.key
                        ORDER BY w.key LIMIT 1)
                FROM keys k WHERE k.key IS NOT NULL
            ), room AS (
                SELECT k.key, cfg.key_concurrency - (SELECT count(*) FROM work_queue r
                                                     WHERE r.lease_queue = cfg.name AND r.key = k.key
                                                       AND r.visible_at > t)::integer AS free
                FROM keys k WHERE k.key IS NOT NULL
            ), keyed AS (
                SELECT c.id, c.priority FROM room
                CROSS JOIN LATERAL (
                    SELECT w.id, w.priority FROM work_queue w
                    WHERE w.queue = cfg.name AND w.key = room.key AND w.name = ANY (activity_names)
                      AND w.visible_at <= t
                    ORDER BY w.priority DESC, w.id
                    LIMIT least(greatest(room.free, 0), allowed)
                ) c
            ), unkeyed AS (
                SELECT w.id, w.priority FROM work_queue w
                WHERE w.queue = cfg.name AND w.key IS NULL AND w.name = ANY (activity_names) AND w.visible_at <= t
                ORDER BY w.priority DESC, w.id
                LIMIT allowed
            ), best AS (
                SELECT u.id FROM (SELECT * FROM keyed UNION ALL SELECT * FROM unkeyed) u
                ORDER BY u.priority DESC, u.id
                LIMIT allowed
            ), picked AS (  -- a row deleted meanwhile (its instance ended) is skipped
                SELECT w.id FROM work_queue w
                WHERE w.id IN (SELECT b.id FROM best b) AND w.visible_at <= t
                FOR UPDATE SKIP LOCKED
            ), claimed AS (
                UPDATE work_queue w
                SET visible_at = t + make_interval(secs => lease_seconds), lease_token = gen_random_uuid(),
                    lease_owner = owner_id, lease_queue = cfg.name
                FROM picked p WHERE w.id = p.id
                RETURNING w.id, w.instance_id, w.execution_id, w.task_id, w.name, w.input, w.retry, w.attempt,
                          w.lease_token, w.queue
            )
            SELECT c.*, NULL::double precision FROM claimed c;
            GET DIAGNOSTICS got = ROW_COUNT;
        END IF;
        total := total + got;
        IF cfg.rate_limit IS NOT NULL AND got > 0 THEN
            INSERT INTO queue_starts (queue, started_at) SELECT cfg.name, t FROM generate_series(1, got);
            started := started + got;
            oldest := coalesce(oldest, t);
        END IF;
        IF got < want THEN  -- this queue gave less than asked: when could it give more by the clock?
            IF cfg.rate_limit IS NOT NULL AND started >= cfg.rate_limit THEN
                hint := least(hint, extract(epoch FROM oldest + span - clock_timestamp())::double precision);
            END IF;
            SELECT extract(epoch FROM min(w.visible_at) - clock_timestamp())::double precision INTO due
            FROM work_queue w WHERE w.queue = cfg.name AND w.name = ANY (activity_names) AND w.visible_at > t;
            hint := least(hint, due);
        END IF;
    END LOOP;
    IF total < max_items THEN
        wake_in := hint;
        RETURN NEXT;
    END IF;
END $$;

-- Lease up to max_items ready items without a queue of activity_names, oldest first per name along
-- (name, id); its planner settings keep that index walk whatever the statistics say (0018).
CREATE OR REPLACE FUNCTION claim_work(activity_names text[], max_items integer, lease_seconds double precision,
                                      owner_id text, clock_offset interval)
RETURNS TABLE (id bigint, instance_id text, execution_id integer, task_id integer, name text, input jsonb,
               retry jsonb, attempt integer, lease_token uuid)
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT SET enable_bitmapscan = off SET enable_sort = off AS $$
WITH picked AS (
    SELECT w.id FROM unnest($1) AS n(name)
    CROSS JOIN LATERAL (
        SELECT q.id FROM work_queue q
        WHERE q.name = n.name AND q.visible_at <= now() + $5 AND num_nulls(q.queue) = 1
        ORDER BY q.id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS w
    LIMIT $2
)
UPDATE work_queue w
SET visible_at = now() + $5 + make_interval(secs => $3),
    lease_token = gen_random_uuid(),
    lease_owner = $4
FROM picked
WHERE w.id = picked.id
RETURNING w.id, w.instance_id, w.execution_id, w.task_id, w.name, w.input, w.retry, w.attempt, w.lease_token
$$;

-- The id of the instance a schedule starts for one fire time (ISO 8601 UTC, to the second).
CREATE OR REPLACE FUNCTION schedule_instance_id(schedule_id text, fire_at timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT schedule_id || '@' || to_char(fire_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
$$;

-- The client API of schedules (SECURITY DEFINER: clients write no table themselves).  Unknown
-- ids raise no_data_found, a taken one unique_violation.
CREATE OR REPLACE FUNCTION create_schedule(p_schedule_id text, p_orchestration text, p_input jsonb, p_cron text,
                                           p_every interval, p_timezone text, p_overlap text, p_catchup text,
                                           p_next_fire_at timestamptz) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF p_orchestration LIKE 'pgdurable.%' THEN
        RAISE EXCEPTION 'pgdurable.create_schedule: % is a built-in orchestration', p_orchestration
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO schedules (schedule_id, orchestration, input, cron, every, timezone, overlap, catchup, next_fire_at)
    VALUES (p_schedule_id, p_orchestration, coalesce(p_input, 'null'), p_cron, p_every, p_timezone, p_overlap,
            p_catchup, p_next_fire_at);
END $$;

-- Pause, or resume with a new next_fire_at (NULL keeps it).
CREATE OR REPLACE FUNCTION set_schedule_paused(p_schedule_id text, p_paused boolean, p_next_fire_at timestamptz)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE schedules s
    SET paused = p_paused, next_fire_at = coalesce(p_next_fire_at, s.next_fire_at), updated_at = now()
    WHERE s.schedule_id = p_schedule_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % not found', p_schedule_id USING ERRCODE = 'no_data_found';
    END IF;
END $$;

-- Deleting a schedule keeps the instances it started.
CREATE OR REPLACE FUNCTION delete_schedule(p_schedule_id text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM schedules s WHERE s.schedule_id = p_schedule_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % not found', p_schedule_id USING ERRCODE = 'no_data_found';
    END IF;
END $$;

-- One firing now (paused or not); returns its instance id.
CREATE OR REPLACE FUNCTION trigger_schedule(p_schedule_id text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    s schedules;
    id text;
BEGIN
    SELECT * INTO s FROM schedules x WHERE x.schedule_id = p_schedule_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % not found', p_schedule_id USING ERRCODE = 'no_data_found';
    END IF;
    id := schedule_instance_id(s.schedule_id, now());
    PERFORM create_instances(ARRAY[id], ARRAY[s.orchestration], ARRAY[s.input], ARRAY[NULL::text],
                             ARRAY[NULL::integer], ARRAY[NULL::integer]);
    UPDATE schedules x SET last_instance_id = id, updated_at = now() WHERE x.schedule_id = s.schedule_id;
    RETURN id;
END $$;

REVOKE ALL ON FUNCTION create_schedule(text, text, jsonb, text, interval, text, text, text, timestamptz),
    set_schedule_paused(text, boolean, timestamptz), delete_schedule(text), trigger_schedule(text) FROM PUBLIC;
