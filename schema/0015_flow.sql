-- pgdurable_async, flow control and schedules.
--   * queues: limits that hold across every worker, enforced when items are claimed
--     (claim_queued below): `concurrency` leased at once, `rate_limit` starts in any
--     sliding window of `rate_per` (queue_starts holds the recent starts), and
--     `key_concurrency` leased at once per work item key.  A claim of a limited queue
--     locks the queue's row, so concurrent claimers of one queue take turns.
--   * work_queue.queue / key / priority: set when the item is enqueued; lease_queue is set
--     only while a limited claim's lease is held (the claim path of queue-less items never
--     touches it, so their lease updates stay HOT, and it keeps its (name, id) index).  In a
--     queue: higher priority first, FIFO within one.
--   * registry.queue: the queue an activity runs under, for apps that call it without
--     registering it.
--   * schedules: cron or interval schedules fired by the runtimes (one transaction creates
--     the instance "<schedule_id>@<fire time>" and advances next_fire_at); changes NOTIFY
--     <schema>_schedule.  Clients manage them through SECURITY DEFINER functions.
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

ALTER TABLE registry ADD COLUMN IF NOT EXISTS queue text;

ALTER TABLE work_queue ADD COLUMN IF NOT EXISTS queue text;
ALTER TABLE work_queue ADD COLUMN IF NOT EXISTS key text;
ALTER TABLE work_queue ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0;
ALTER TABLE work_queue ADD COLUMN IF NOT EXISTS lease_queue text;
CREATE INDEX IF NOT EXISTS work_queue_queued ON work_queue (queue, priority DESC, id) WHERE queue IS NOT NULL;
CREATE INDEX IF NOT EXISTS work_queue_keyed ON work_queue (queue, key, priority DESC, id)
    WHERE queue IS NOT NULL AND key IS NOT NULL;
CREATE INDEX IF NOT EXISTS work_queue_leased ON work_queue (lease_queue, key) WHERE lease_queue IS NOT NULL;

CREATE TABLE IF NOT EXISTS queues (
    name            text PRIMARY KEY,
    concurrency     integer CHECK (concurrency >= 1),
    rate_limit      integer CHECK (rate_limit >= 1),
    rate_per        interval CHECK (rate_per > interval '0'),
    key_concurrency integer CHECK (key_concurrency >= 1),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_limit IS NULL) = (rate_per IS NULL))
);

CREATE TABLE IF NOT EXISTS queue_starts (
    queue      text NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_starts_window ON queue_starts (queue, started_at);

CREATE TABLE IF NOT EXISTS schedules (
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
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_fire_at) WHERE NOT paused;

DROP TRIGGER IF EXISTS schedules_notify ON schedules;
CREATE TRIGGER schedules_notify AFTER INSERT OR UPDATE OR DELETE ON schedules
    FOR EACH STATEMENT EXECUTE FUNCTION notify_insert('schedule');

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
                   '%1$I.fork(text, integer, text) TO %2$I', s, role_name);
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   '%1$I.create_schedule(text, text, jsonb, text, interval, text, text, text, timestamptz), '
                   '%1$I.set_schedule_paused(text, boolean, timestamptz), %1$I.delete_schedule(text), '
                   '%1$I.trigger_schedule(text) TO %2$I', s, role_name);
END $$;

-- A worker also fires schedules (creating instances) and claims queued work.
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
