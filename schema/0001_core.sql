-- pgdurable_async core schema, version 1.
-- Applied by `python -m pgdurable_async migrate` (and Runtime start) with
-- search_path set to the target schema, inside one transaction, under an
-- advisory lock.  Idempotent: every object is created only if missing.

CREATE TABLE IF NOT EXISTS instances (
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
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS instances_status_name ON instances (status, name);
CREATE INDEX IF NOT EXISTS instances_created ON instances (created_at DESC);

-- Append-only event log, one row per fact.
CREATE TABLE IF NOT EXISTS history (
    instance_id  text NOT NULL,
    execution_id integer NOT NULL,
    seq          integer NOT NULL,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}',
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, execution_id, seq)
);

CREATE OR REPLACE FUNCTION history_immutable() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'pgdurable history is append-only: UPDATE refused'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'pgdurable history is append-only: TRUNCATE refused'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- DELETE: only rows of instances that are gone or finished (purge).
    IF EXISTS (SELECT 1 FROM instances i
               WHERE i.instance_id = OLD.instance_id
                 AND i.status NOT IN ('completed', 'failed', 'cancelled', 'terminated')) THEN
        RAISE EXCEPTION 'pgdurable history is append-only: instance % is not finished', OLD.instance_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END $$;

DROP TRIGGER IF EXISTS history_no_update ON history;
CREATE TRIGGER history_no_update BEFORE UPDATE OR DELETE ON history
    FOR EACH ROW EXECUTE FUNCTION history_immutable();
DROP TRIGGER IF EXISTS history_no_truncate ON history;
CREATE TRIGGER history_no_truncate BEFORE TRUNCATE ON history
    FOR EACH STATEMENT EXECUTE FUNCTION history_immutable();

-- Messages that drive turns: each row becomes one history event.
CREATE TABLE IF NOT EXISTS orchestrator_queue (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   text NOT NULL,
    execution_id  integer,              -- NULL: whatever execution is current
    orchestration text NOT NULL,        -- lets a runtime claim only what it can run
    kind          text NOT NULL,
    payload       jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orchestrator_queue_claim ON orchestrator_queue (orchestration, instance_id);
CREATE INDEX IF NOT EXISTS orchestrator_queue_instance ON orchestrator_queue (instance_id, id);

-- Activity work items.  visible_at is both the retry backoff and the lease expiry.
CREATE TABLE IF NOT EXISTS work_queue (
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
CREATE INDEX IF NOT EXISTS work_queue_claim ON work_queue (name, visible_at);

-- Durable timers.
CREATE TABLE IF NOT EXISTS timers (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id   text NOT NULL,
    execution_id  integer NOT NULL,
    task_id       integer NOT NULL,
    orchestration text NOT NULL,
    fire_at       timestamptz NOT NULL,
    UNIQUE (instance_id, execution_id, task_id)
);
CREATE INDEX IF NOT EXISTS timers_due ON timers (fire_at);

-- Names each runtime registers, so clients can reject unknown names.
CREATE TABLE IF NOT EXISTS registry (
    kind      text NOT NULL CHECK (kind IN ('orchestration', 'activity')),
    name      text NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, name)
);

-- Live workers and the backend of their LISTEN session (dead sessions free their leases).
CREATE TABLE IF NOT EXISTS workers (
    worker_id     text PRIMARY KEY,
    backend_pid   integer NOT NULL,
    backend_start timestamptz,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- Wake-ups: one NOTIFY per statement, on a channel named after the schema.
CREATE OR REPLACE FUNCTION notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_' || TG_ARGV[0], '');
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS orchestrator_queue_notify ON orchestrator_queue;
CREATE TRIGGER orchestrator_queue_notify AFTER INSERT ON orchestrator_queue
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('orch');
DROP TRIGGER IF EXISTS work_queue_notify ON work_queue;
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

DROP TRIGGER IF EXISTS timers_notify ON timers;
CREATE TRIGGER timers_notify AFTER INSERT ON timers
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_timer();

-- Instance finished: wakes Client.wait / handle.result.
CREATE OR REPLACE FUNCTION notify_done() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_done', NEW.instance_id);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS instances_done_notify ON instances;
CREATE TRIGGER instances_done_notify AFTER UPDATE OF status ON instances
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('completed', 'failed', 'cancelled', 'terminated'))
    EXECUTE FUNCTION notify_done();
