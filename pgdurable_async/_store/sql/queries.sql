-- Every query the runtime and client run, under `-- name: <key>` headers.
-- Loaded once by sql_loader.py; each is run by one typed function of the store.
-- Tables are unqualified: connections set search_path to the configured schema (at connect,
-- or behind a transaction pooler at the start of every transaction: database.py).
-- JSON travels as text and is cast to jsonb here.
-- The runtime's clock is the database's: now() + the runtime's clock offset (an interval
-- parameter, zero except under testing.Environment's time skipping) in every query that
-- reads the durable time (history times, ctx.now(), timers, activity visibility and leases).

-- name: api_start
-- The SECURITY DEFINER client API (schema/0003): raises unique_violation for a taken id.
SELECT start($2, $3::text::jsonb, $1);

-- name: api_start_deferred
-- api_start whose start message does not NOTIFY (schema 0018's pgdurable.notify): the caller
-- notifies after the commit (notify_channels).  The FROM item is evaluated before start().
SELECT start($2, $3::text::jsonb, $1) FROM (SELECT set_config('pgdurable.notify', 'deferred', true)) AS quiet;

-- name: defer_notify
-- The rest of this transaction's inserts do not NOTIFY: the caller does after its commit.
SELECT set_config('pgdurable.notify', 'deferred', true);

-- name: notify_channels
-- The NOTIFYs of a committed deferred transaction, in a transaction of their own that does not
-- wait for its WAL flush (a lost one costs a sweep's latency, never work).
SELECT set_config('synchronous_commit', 'off', true), pg_notify(c, '') FROM unnest($1::text[]) AS c;

-- name: api_submit_graph
-- A graph instance submitted as the session's current role (schema 0009's df._submit).
SELECT df._submit($1::text::jsonb, $2, coalesce($3, '"$user", public'), coalesce($4::text::jsonb, '{}'), $5);

-- name: api_send
-- An event or cancel for a live instance (a finished one ignores it); no_data_found if unknown.
SELECT send($1, $2, $3::text::jsonb);

-- name: claim_instances
-- Lock up to $2 instances that have pending messages and that this runtime can run.
-- now(): the database's clock is the one clock of history times, ctx.now() and timers.
SELECT i.instance_id, i.name, i.status, i.execution_id, i.history_len,
       i.parent_instance_id, i.parent_execution_id, i.parent_task_id, now() + $5::interval AS db_now
FROM instances i
WHERE i.instance_id IN (
    SELECT DISTINCT q.instance_id FROM orchestrator_queue q
    WHERE q.orchestration = ANY($1::text[]) AND NOT (q.instance_id = ANY($4::text[]))
    LIMIT $3
)
FOR UPDATE OF i SKIP LOCKED
LIMIT $2;

-- name: messages_waiting
-- After a claim that locked nothing: do messages of these orchestrations wait anyway (their
-- instances locked by another worker's turn, which may have died holding them)?
SELECT EXISTS (SELECT 1 FROM orchestrator_queue
               WHERE orchestration = ANY($1::text[]) AND NOT (instance_id = ANY($2::text[])));

-- name: fetch_messages
SELECT id, instance_id, execution_id, kind, payload
FROM orchestrator_queue
WHERE instance_id = ANY($1::text[])
ORDER BY id;

-- name: message_ids
-- Only the ids: failing an instance must not depend on decoding its messages.
SELECT id FROM orchestrator_queue WHERE instance_id = ANY($1::text[]);

-- name: last_seq
SELECT coalesce(max(seq), 0) FROM history WHERE instance_id = $1 AND execution_id = $2;

-- name: fetch_histories
SELECT h.instance_id, h.execution_id, h.seq, h.event_type, h.payload, h.recorded_at
FROM history h
JOIN unnest($1::text[], $2::int[]) AS t(instance_id, execution_id)
  ON h.instance_id = t.instance_id AND h.execution_id = t.execution_id
ORDER BY h.instance_id, h.seq;

-- name: append_history
INSERT INTO history (instance_id, execution_id, seq, event_type, payload, recorded_at)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::text[]::jsonb[], $6::timestamptz[]);

-- name: enqueue_work
INSERT INTO work_queue (instance_id, execution_id, task_id, orchestration, name, input, retry)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::text[],
                     $6::text[]::jsonb[], $7::text[]::jsonb[])
ON CONFLICT (instance_id, execution_id, task_id) DO NOTHING;

-- name: enqueue_work_flow
-- enqueue_work with each item's queue, key and priority.  An activity the enqueuing app does not
-- register ($9 false) runs under the queue its registering app recorded in the registry.
INSERT INTO work_queue (instance_id, execution_id, task_id, orchestration, name, input, retry, queue, key, priority)
SELECT w.instance_id, w.execution_id, w.task_id, w.orchestration, w.name, w.input::jsonb, w.retry::jsonb,
       CASE WHEN w.local THEN w.queue
            ELSE (SELECT r.queue FROM registry r WHERE r.kind = 'activity' AND r.name = w.name) END,
       w.key, w.priority
FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::bool[], $10::text[], $11::int[])
     AS w(instance_id, execution_id, task_id, orchestration, name, input, retry, queue, local, key, priority)
ON CONFLICT (instance_id, execution_id, task_id) DO NOTHING;

-- name: create_timers
INSERT INTO timers (instance_id, execution_id, task_id, orchestration, fire_at)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::timestamptz[])
ON CONFLICT (instance_id, execution_id, task_id) DO NOTHING;

-- name: create_children
-- Start child instances; returns the ids actually created (others already existed).
SELECT create_instances($1::text[], $2::text[], $3::text[]::jsonb[], $4::text[], $5::int[], $6::int[])
       AS instance_id;

-- name: enqueue_messages
-- Messages to instances named by id (their orchestration name is looked up).
INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
SELECT m.instance_id, m.execution_id, i.name, m.kind, m.payload::jsonb
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[]) WITH ORDINALITY
     AS m(instance_id, execution_id, kind, payload, n)
JOIN instances i ON i.instance_id = m.instance_id
ORDER BY m.n;

-- name: update_instances
-- An instance df.cancel marked cancelled stays cancelled, whatever its execution does next.
UPDATE instances i
SET status = CASE WHEN i.status = 'cancelled' THEN 'cancelled' ELSE u.status END,
    output = u.output::jsonb,
    error = u.error::jsonb,
    custom_status = CASE WHEN u.custom_status_set THEN u.custom_status::jsonb ELSE i.custom_status END,
    execution_id = u.execution_id,
    history_len = u.history_len,
    input = CASE WHEN u.input IS NULL THEN i.input ELSE u.input::jsonb END,
    event_waits = u.event_waits::jsonb,
    updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::text[],
            $7::int[], $8::int[], $9::text[], $10::text[])
     AS u(instance_id, status, output, error, custom_status_set, custom_status,
          execution_id, history_len, input, event_waits)
WHERE i.instance_id = u.instance_id;

-- name: delete_messages
DELETE FROM orchestrator_queue WHERE id = ANY($1::bigint[]);

-- name: drop_pending_work
-- An instance finished: its outstanding activities and timers are moot.
WITH work AS (DELETE FROM work_queue WHERE instance_id = ANY($1::text[]))
DELETE FROM timers WHERE instance_id = ANY($1::text[]);

-- name: claim_work
-- Oldest visible items without a queue first, per activity name, along the (name, id) index
-- (schema function claim_work, 0018: its planner settings keep that plan whatever the statistics
-- say).  Queues, and with them priorities: claim_queued.
SELECT * FROM claim_work($1::text[], $2, $3, $4, $5::interval);

-- name: next_work_due
-- Seconds until the earliest item without a queue becomes visible, by the database's clock.
SELECT extract(epoch FROM min(visible_at) - (now() + $2::interval))::float8 FROM work_queue
WHERE name = ANY($1::text[]) AND queue IS NULL;

-- name: claim_queued
-- Lease items of limited queues within their limits (schema function claim_queued); a row
-- with a NULL id carries the wake-up hint when the claim was short.
SELECT * FROM claim_queued($1::text[], $2::text[], $3, $4, $5);

-- name: notify_work
-- Queued items finished or went back: claimers waiting on those queues' limits look again.
SELECT pg_notify($1, '');

-- name: upsert_queues
-- A runtime's queues and their limits (the last runtime to start with a queue sets its limits).
INSERT INTO queues (name, concurrency, rate_limit, rate_per, key_concurrency)
SELECT u.name, u.concurrency, u.rate_limit, make_interval(secs => u.rate_per), u.key_concurrency
FROM unnest($1::text[], $2::int[], $3::int[], $4::float8[], $5::int[])
     AS u(name, concurrency, rate_limit, rate_per, key_concurrency)
ON CONFLICT (name) DO UPDATE
SET concurrency = excluded.concurrency, rate_limit = excluded.rate_limit, rate_per = excluded.rate_per,
    key_concurrency = excluded.key_concurrency, updated_at = now()
WHERE (queues.concurrency, queues.rate_limit, queues.rate_per, queues.key_concurrency)
      IS DISTINCT FROM (excluded.concurrency, excluded.rate_limit, excluded.rate_per, excluded.key_concurrency);

-- name: queue_depths
-- Per queue: its limits, and its items ready (visible, or with an expired lease), running
-- (leased) and delayed (waiting out a retry backoff), by the database's clock.
SELECT q.name, q.concurrency, q.rate_limit, extract(epoch FROM q.rate_per)::float8 AS rate_per, q.key_concurrency,
       count(w.id) FILTER (WHERE w.visible_at <= now()) AS ready,
       count(w.id) FILTER (WHERE w.visible_at > now() AND w.lease_token IS NOT NULL) AS running,
       count(w.id) FILTER (WHERE w.visible_at > now() AND w.lease_token IS NULL) AS delayed
FROM queues q LEFT JOIN work_queue w ON w.queue = q.name
GROUP BY q.name
ORDER BY q.name;

-- name: extend_leases
UPDATE work_queue SET visible_at = now() + $3::interval + make_interval(secs => $2)
WHERE lease_token = ANY($1::uuid[]);

-- name: ack_work
-- Delete finished items still leased by us and turn them into result messages; $5 'deferred':
-- the insert does not NOTIFY (the caller does after the commit), '' it does.
WITH quiet AS (
    SELECT set_config('pgdurable.notify', $5, true) AS mode
), results AS (
    SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[])
             AS r(id, token, kind, payload)
), done AS (
    DELETE FROM work_queue w USING results r
    WHERE w.id = r.id AND w.lease_token = r.token
    RETURNING w.instance_id, w.execution_id, w.orchestration, r.kind, r.payload
)
INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
SELECT instance_id, execution_id, orchestration, kind, payload::jsonb FROM done CROSS JOIN quiet
RETURNING 1;

-- name: retry_work
UPDATE work_queue w
SET attempt = w.attempt + 1,
    visible_at = now() + $4::interval + make_interval(secs => r.delay),
    lease_token = NULL,
    lease_owner = NULL,
    lease_queue = NULL
FROM unnest($1::bigint[], $2::uuid[], $3::float8[]) AS r(id, token, delay)
WHERE w.id = r.id AND w.lease_token = r.token;

-- name: release_leases
UPDATE work_queue w
SET visible_at = now(), lease_token = NULL, lease_owner = NULL, lease_queue = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS r(id, token)
WHERE w.id = r.id AND w.lease_token = r.token;

-- name: lock_work_item
-- A transactional activity holds its item's row lock while its SQL runs.
SELECT id FROM work_queue WHERE id = $1 AND lease_token = $2 FOR UPDATE;

-- name: user_search_path
-- The search_path the login role's sessions get (ALTER ROLE / DATABASE ... SET, most
-- specific first, else the server default).  Our sessions override it with the
-- pgdurable schema; a transactional activity's own SQL runs with this one.
SELECT coalesce(
    (SELECT substr(c, length('search_path=') + 1)
     FROM pg_db_role_setting s CROSS JOIN unnest(s.setconfig) AS c
     WHERE c LIKE 'search_path=%'
       AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = session_user))
       AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
     ORDER BY s.setrole <> 0 DESC, s.setdatabase <> 0 DESC
     LIMIT 1),
    (SELECT boot_val FROM pg_settings WHERE name = 'search_path'));

-- name: set_search_path
SELECT set_config('search_path', $1, true);

-- name: notify_probe
-- wake="auto": the NOTIFY a LISTEN session under test must receive (listener.self_test); also
-- the search_path this session got, which a pooler may have dropped from the startup packet.
SELECT current_setting('search_path') FROM (SELECT pg_notify($1, '')) AS sent;

-- name: session_is_direct
-- wake="auto", when that NOTIFY is late: does the LISTEN session's reported pid ($1) name the
-- backend that ran its LISTEN on the probe channel ($2)?  Then it is a session of its own and
-- PostgreSQL is only slow (PgBouncer reports a random pid).
SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%' || $2 || '%');

-- name: fire_timers
WITH due AS (
    DELETE FROM timers
    WHERE id IN (SELECT id FROM timers
                 WHERE fire_at <= now() + $3::interval AND orchestration = ANY($1::text[])
                 ORDER BY fire_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)
    RETURNING instance_id, execution_id, task_id, orchestration
), sent AS (
    INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
    SELECT instance_id, execution_id, orchestration, 'timer_fired',
           jsonb_build_object('task_id', task_id)
    FROM due
    RETURNING 1
)
SELECT count(*) FROM sent;

-- name: next_timer
-- Seconds until the earliest timer is due, by the database's clock (the one fire_timers uses).
SELECT extract(epoch FROM min(fire_at) - (now() + $2::interval))::float8 FROM timers
WHERE orchestration = ANY($1::text[]);

-- name: register_names
-- The names an app serves; an activity also records its queue (NULL: none).
INSERT INTO registry (kind, name, queue)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT (kind, name) DO UPDATE SET last_seen = now(), queue = excluded.queue;

-- name: known_names
SELECT name FROM registry WHERE kind = $1 AND name = ANY($2::text[]);

-- name: register_worker
INSERT INTO workers (worker_id, backend_pid, backend_start)
SELECT $1, pg_backend_pid(), a.backend_start
FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
ON CONFLICT (worker_id) DO UPDATE
SET backend_pid = excluded.backend_pid, backend_start = excluded.backend_start, heartbeat_at = now(),
    expires_at = NULL;

-- name: heartbeat_worker
-- A worker without a LISTEN session (wake="poll") is alive while it keeps renewing expires_at;
-- its pooled sessions say nothing about it.
INSERT INTO workers (worker_id, backend_pid, backend_start, expires_at)
VALUES ($1, NULL, NULL, now() + make_interval(secs => $2))
ON CONFLICT (worker_id) DO UPDATE
SET backend_pid = NULL, backend_start = NULL, heartbeat_at = now(), expires_at = excluded.expires_at;

-- name: deregister_worker
DELETE FROM workers WHERE worker_id = $1;

-- name: release_dead_leases
-- Workers whose LISTEN session is gone have died: their leases expire now.  A row is
-- deleted only if it still names the session seen dead (a worker that re-registered
-- meanwhile keeps its new row: READ COMMITTED re-checks the row, not the anti-join).
-- Without pg_read_all_stats, another role's sessions show backend_start as NULL: a live
-- pid is then trusted (were it reused, that lease would merely wait out its expiry).
-- A worker without a session (backend_pid NULL, wake="poll") has died when its heartbeat
-- expired; a heartbeat renewed meanwhile keeps the row (expires_at is re-checked).
WITH seen_dead AS (
    SELECT w.worker_id, w.backend_pid, w.backend_start FROM workers w
    WHERE w.backend_pid IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                      WHERE a.pid = w.backend_pid
                        AND (a.backend_start IS NULL OR a.backend_start = w.backend_start))
), dead AS (
    DELETE FROM workers w USING seen_dead d
    WHERE w.worker_id = d.worker_id AND w.backend_pid = d.backend_pid
      AND w.backend_start IS NOT DISTINCT FROM d.backend_start
    RETURNING w.worker_id
), expired AS (
    DELETE FROM workers w WHERE w.backend_pid IS NULL AND w.expires_at < now()
    RETURNING w.worker_id
)
UPDATE work_queue SET visible_at = now()
WHERE id IN (SELECT id FROM work_queue
             WHERE lease_owner IN (SELECT worker_id FROM dead UNION ALL SELECT worker_id FROM expired)
               AND lease_token IS NOT NULL
             FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: df_retention_settings
-- pg_durable's retention settings as it reads them (defaults: a pass every 3600 s, 30 days), and
-- whether this worker may run the pass (df installed, df._expire granted: the owner, grant_worker).
SELECT CASE WHEN s.interval ~ '^[0-9]{1,9}$' THEN s.interval::int ELSE 3600 END AS reconcile_interval,
       CASE WHEN s.days ~ '^[0-9]{1,5}$' THEN s.days::int ELSE 30 END AS retention_days,
       to_regprocedure('df._expire(integer, integer, integer)') IS NOT NULL
           AND has_function_privilege('df._expire(integer, integer, integer)', 'EXECUTE') AS allowed
FROM (SELECT btrim(coalesce(current_setting('pg_durable.reconcile_interval', true), '')) AS interval,
             btrim(coalesce(current_setting('pg_durable.retention_days', true), '')) AS days) s;

-- name: df_expire
-- One batch of finished df instances past pg_durable's retention window or cap (10,000).
SELECT df._expire($1, 10000, $2);
-- name: db_now
SELECT now();

-- name: api_create_schedule
-- The SECURITY DEFINER client API of schedules (schema 0011): unique_violation for a taken id,
-- no_data_found for an unknown one.
SELECT create_schedule($1, $2, $3::text::jsonb, $4, $5::interval, $6, $7, $8, $9);

-- name: api_set_schedule_paused
SELECT set_schedule_paused($1, $2, $3);

-- name: api_delete_schedule
SELECT delete_schedule($1);

-- name: api_trigger_schedule
SELECT trigger_schedule($1);

-- name: get_schedule
SELECT schedule_id, orchestration, input, cron, every, timezone, overlap, catchup, paused, next_fire_at,
       last_instance_id
FROM schedules WHERE schedule_id = $1;

-- name: list_schedules
SELECT schedule_id, orchestration, input, cron, every, timezone, overlap, catchup, paused, next_fire_at,
       last_instance_id
FROM schedules ORDER BY schedule_id;

-- name: claim_due_schedules
-- Lock up to $2 due, unpaused schedules of these orchestrations ($3/$4: ids set aside until a
-- time), with whether their last firing's instance still runs, and the database's clock.
SELECT s.schedule_id, s.orchestration, s.input::text AS input_json, s.cron, s.every, s.timezone, s.overlap,
       s.catchup, s.next_fire_at, coalesce(NOT is_finished(i.status), false) AS previous_running, now() AS db_now
FROM schedules s LEFT JOIN instances i ON i.instance_id = s.last_instance_id
WHERE NOT s.paused AND s.next_fire_at <= now() AND s.orchestration = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM unnest($3::text[], $4::timestamptz[]) AS d(schedule_id, until)
                  WHERE d.schedule_id = s.schedule_id AND now() < d.until)
ORDER BY s.next_fire_at
LIMIT $2
FOR UPDATE OF s SKIP LOCKED;

-- name: start_firings
-- One instance per fire time, named by schedule_instance_id (a taken id is skipped).
SELECT create_instances(
    ARRAY(SELECT schedule_instance_id($1, f.fire_at) FROM unnest($2::timestamptz[]) WITH ORDINALITY AS f(fire_at, n)
          ORDER BY f.n),
    array_fill($3::text, ARRAY[cardinality($2::timestamptz[])]),
    array_fill($4::text::jsonb, ARRAY[cardinality($2::timestamptz[])]),
    array_fill(NULL::text, ARRAY[cardinality($2::timestamptz[])]),
    array_fill(NULL::integer, ARRAY[cardinality($2::timestamptz[])]),
    array_fill(NULL::integer, ARRAY[cardinality($2::timestamptz[])])) AS instance_id;

-- name: advance_schedule
-- After a pass over a locked schedule: its next fire time, and its last firing ($3, if any).
UPDATE schedules
SET next_fire_at = $2, updated_at = now(),
    last_instance_id = CASE WHEN $3::timestamptz IS NULL THEN last_instance_id
                            ELSE schedule_instance_id(schedule_id, $3::timestamptz) END
WHERE schedule_id = $1;

-- name: next_schedule_due
-- Seconds until the earliest schedule of these orchestrations is due, or a set-aside one is
-- looked at again, by the database's clock (the one claim_due_schedules uses).
SELECT extract(epoch FROM least(
    (SELECT min(s.next_fire_at) FROM schedules s
     WHERE NOT s.paused AND s.orchestration = ANY($1::text[])
       AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::timestamptz[]) AS d(schedule_id, until)
                       WHERE d.schedule_id = s.schedule_id AND now() < d.until)),
    (SELECT min(d.until) FROM unnest($2::text[], $3::timestamptz[]) AS d(schedule_id, until))
) - now())::float8;

-- name: get_instance
SELECT instance_id, name, status, input, output, error, custom_status, created_at,
       updated_at, execution_id, parent_instance_id
FROM instances WHERE instance_id = $1;

-- name: instances_with_waits
-- Instances by id (in the order given) with what the unfinished ones wait on: the
-- commands of the current execution that have no completion yet (activities, timers,
-- children; one pass over that execution's history) and the event waits of the last turn.
SELECT i.instance_id, i.name, i.status, i.input, i.output, i.error, i.custom_status, i.created_at,
       i.updated_at, i.execution_id, i.parent_instance_id,
       CASE WHEN is_finished(i.status) THEN NULL ELSE i.event_waits END AS event_waits,
       w.open_tasks
FROM unnest($1::text[]) WITH ORDINALITY AS a(instance_id, n)
JOIN instances i ON i.instance_id = a.instance_id
LEFT JOIN LATERAL (
    SELECT jsonb_agg(jsonb_build_object(
               'kind', c.event_type, 'task_id', c.payload -> 'task_id', 'name', c.payload -> 'name',
               'instance_id', c.payload -> 'instance_id', 'fire_at', c.payload -> 'fire_at',
               'since', c.recorded_at) ORDER BY c.seq) AS open_tasks
    FROM history c
    WHERE NOT is_finished(i.status)  -- first: a finished instance's history is not read at all
      AND c.instance_id = i.instance_id AND c.execution_id = i.execution_id
      AND c.event_type IN ('activity_scheduled', 'timer_created', 'sub_orchestration_scheduled')
      AND NOT EXISTS (
          SELECT 1 FROM history d
          WHERE d.instance_id = i.instance_id AND d.execution_id = i.execution_id
            AND d.event_type IN ('activity_completed', 'activity_failed', 'timer_fired',
                                 'sub_orchestration_completed', 'sub_orchestration_failed')
            AND d.payload -> 'task_id' = c.payload -> 'task_id')
) AS w ON true
ORDER BY a.n;

-- name: list_instance_ids
SELECT instance_id FROM instances
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)
ORDER BY created_at DESC, instance_id
LIMIT $3;

-- name: get_history
SELECT execution_id, seq, event_type, payload, recorded_at
FROM history
WHERE instance_id = $1
  AND execution_id = COALESCE($2, (SELECT execution_id FROM instances WHERE instance_id = $1))
ORDER BY seq;

-- name: instance_status
SELECT status FROM instances WHERE instance_id = $1;

-- name: lock_instance
SELECT instance_id, name, status, execution_id, history_len,
       parent_instance_id, parent_execution_id, parent_task_id, now() + $2::interval AS db_now
FROM instances WHERE instance_id = $1 FOR UPDATE;

-- name: terminate_tree
-- Terminate $1 (its row locked by the caller) and, recursively, its unfinished descendants:
-- each records orchestration_terminated (a descendant with cascaded_from, its parent) and
-- loses its messages, work and timers.  A finished child is left alone.  Returns the ids
-- terminated; the caller runs it again until none (a child its parent's turn created meanwhile).
WITH RECURSIVE tree AS (
    SELECT $1::text AS instance_id
    UNION
    SELECT c.instance_id FROM instances c JOIN tree t ON c.parent_instance_id = t.instance_id
), targets AS (
    SELECT i.instance_id, i.execution_id, i.history_len, i.parent_instance_id
    FROM instances i
    WHERE i.instance_id IN (SELECT instance_id FROM tree) AND NOT is_finished(i.status)
    ORDER BY i.instance_id
    FOR UPDATE
), events AS (
    INSERT INTO history (instance_id, execution_id, seq, event_type, payload)
    SELECT t.instance_id, t.execution_id, t.history_len + 1, 'orchestration_terminated',
           CASE WHEN t.instance_id = $1 THEN jsonb_build_object('reason', $2::text)
                ELSE jsonb_build_object('reason', $2::text, 'cascaded_from', t.parent_instance_id) END
    FROM targets t
), messages AS (
    DELETE FROM orchestrator_queue WHERE instance_id IN (SELECT instance_id FROM targets)
), work AS (
    DELETE FROM work_queue WHERE instance_id IN (SELECT instance_id FROM targets)
), timers_gone AS (
    DELETE FROM timers WHERE instance_id IN (SELECT instance_id FROM targets)
)
UPDATE instances i
SET status = 'terminated', history_len = t.history_len + 1, event_waits = NULL, error = $3::text::jsonb,
    updated_at = now()
FROM targets t
WHERE i.instance_id = t.instance_id
RETURNING i.instance_id;

-- name: purge_candidates
-- Up to $3 finished instances, optionally of status $2, not updated for $1 (nor created:
-- created_at <= updated_at, and the created_at index leads the scan, so no index on the
-- hot updated_at column is needed); locked, skipping those a turn holds.
SELECT instance_id FROM instances
WHERE created_at < now() - $1::interval AND updated_at < now() - $1::interval
  AND is_finished(status) AND ($2::text IS NULL OR status = $2)
ORDER BY created_at
LIMIT $3
FOR UPDATE SKIP LOCKED;

-- name: purge_trees
-- Delete the finished instances $1 (locked by the caller) with their finished descendants
-- (one a turn holds stays, and is a root of its own next time), their messages, delivery
-- keys and values; returns the ids deleted (purge_history removes their history next).
WITH RECURSIVE tree AS (
    SELECT unnest($1::text[]) AS instance_id
    UNION
    SELECT c.instance_id FROM instances c JOIN tree t ON c.parent_instance_id = t.instance_id
    WHERE is_finished(c.status)
), locked AS (
    SELECT i.instance_id FROM instances i
    WHERE i.instance_id IN (SELECT instance_id FROM tree) AND is_finished(i.status)
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM instances WHERE instance_id IN (SELECT instance_id FROM locked)
    RETURNING instance_id
), messages AS (
    DELETE FROM orchestrator_queue WHERE instance_id IN (SELECT instance_id FROM gone)
), deliveries AS (
    DELETE FROM event_deliveries WHERE instance_id IN (SELECT instance_id FROM gone)
), values_gone AS (
    DELETE FROM instance_values WHERE instance_id IN (SELECT instance_id FROM gone)
)
SELECT instance_id FROM gone;

-- name: purge_history
-- History rows go only after their instance row (the history_immutable trigger checks).
DELETE FROM history WHERE instance_id = ANY($1::text[]);

-- name: api_fork
-- The SECURITY DEFINER fork() of schema 0010; no_data_found, unique_violation,
-- invalid_parameter_value or insufficient_privilege (a built-in) when it cannot.
SELECT fork($1, $2, $3);

-- name: get_value
-- Whether the instance exists, whether it set the key, and the value.
SELECT EXISTS (SELECT 1 FROM instances WHERE instance_id = $1) AS found,
       v.key IS NOT NULL AS has_value, v.value
FROM (SELECT 1) AS one
LEFT JOIN instance_values v ON v.instance_id = $1 AND v.key = $2;

-- name: set_values
-- The durable values a batch of turns recorded (value_set events), the last one per key.
INSERT INTO instance_values (instance_id, key, value, execution_id, seq)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[]::jsonb[], $4::int[], $5::int[])
ON CONFLICT (instance_id, key) DO UPDATE
SET value = excluded.value, execution_id = excluded.execution_id, seq = excluded.seq, updated_at = now();

-- name: cancel_children
-- A cancel an instance recorded reaches its unfinished children (payloads $2, one per parent $1).
INSERT INTO orchestrator_queue (instance_id, execution_id, orchestration, kind, payload)
SELECT c.instance_id, NULL, c.name, 'cancel_requested', p.payload::jsonb
FROM unnest($1::text[], $2::text[]) AS p(parent_id, payload)
JOIN instances c ON c.parent_instance_id = p.parent_id
WHERE NOT is_finished(c.status);

-- name: skip_target
-- testing.Environment's time skipping: is anything runnable now (a message, or a visible or
-- leased work item), and else how many seconds until the earliest timer or retry, by the
-- runtime's clock ($3: its offset).
SELECT EXISTS (SELECT 1 FROM orchestrator_queue WHERE orchestration = ANY($1::text[]))
       OR EXISTS (SELECT 1 FROM work_queue WHERE name = ANY($2::text[])
                  AND (lease_token IS NOT NULL OR visible_at <= now() + $3::interval)) AS busy,
       extract(epoch FROM least((SELECT min(fire_at) FROM timers WHERE orchestration = ANY($1::text[])),
                                (SELECT min(visible_at) FROM work_queue WHERE name = ANY($2::text[])))
               - (now() + $3::interval))::float8 AS due_in;

-- name: node_submitter
-- Who a graph node's SQL runs as: the role recorded when the instance was submitted (and whether
-- this worker's settings let a superuser's graph run); with $2, a function's signature (df.http's
-- for an HTTP node), whether that role may still use df and call it.
SELECT i.name, i.status, i.submitted_by, r.rolname, coalesce(r.rolsuper, false) AS rolsuper,
       lower(btrim(coalesce(current_setting('pg_durable.enable_superuser_instances', true), '')))
           IN ('on', 'true', 'yes', '1') AS superuser_allowed,
       $2::text IS NOT NULL AND r.oid IS NOT NULL AND has_schema_privilege(r.oid, 'df', 'USAGE')
           AND has_function_privilege(r.oid, $2::text, 'EXECUTE') AS granted
FROM instances i LEFT JOIN pg_roles r ON r.oid = i.submitted_by
WHERE i.instance_id = $1;

-- name: enter_tenant
-- For the rest of the transaction: the tenant's role and search_path (qualified calls only
-- from here on: the tenant's search_path may shadow unqualified names), and df.in_workflow,
-- which df.setvar, df.await_instance and df.start(transaction_mode => 'new') refuse to run under.
SELECT pg_catalog.set_config('role', $1, true), pg_catalog.set_config('search_path', $2, true),
       pg_catalog.set_config('df.in_workflow', 'true', true);

-- name: leave_tenant
-- Back to the worker's role, resolving names in the catalog only until the caller sets its own path.
SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true), pg_catalog.set_config('role', 'none', true),
       pg_catalog.set_config('df.in_workflow', '', true);

-- name: enter_app_graph
-- An App.graph node runs as the worker, under df.in_workflow too.
SELECT pg_catalog.set_config('search_path', $1, true), pg_catalog.set_config('df.in_workflow', 'true', true);

-- name: leave_app_graph
SELECT pg_catalog.set_config('df.in_workflow', '', true);

-- name: node_wrapper_rows
-- The tenant's statement runs inside a SECURITY DEFINER function owned by the tenant
-- (created while the role is the tenant's): PostgreSQL refuses every role change inside
-- one (SET ROLE, set_config('role'), SET SESSION AUTHORIZATION, in any nesting).  It is a
-- temporary function, private to this session and transaction, executable by its owner only.
-- {args}, {using}, {types}: one text parameter per bind parameter of the statement.
CREATE FUNCTION pg_temp.pgdurable_node(q pg_catalog.text{args}) RETURNS SETOF record
LANGUAGE plpgsql SECURITY DEFINER AS $node$ BEGIN RETURN QUERY EXECUTE q{using}; END $node$;
REVOKE ALL ON FUNCTION pg_temp.pgdurable_node(pg_catalog.text{types}) FROM PUBLIC;

-- name: node_wrapper_void
-- As node_wrapper_rows, for a statement that returns no rows (DML without RETURNING, DDL, DO).
CREATE FUNCTION pg_temp.pgdurable_node(q pg_catalog.text{args}) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $node$ BEGIN EXECUTE q{using}; END $node$;
REVOKE ALL ON FUNCTION pg_temp.pgdurable_node(pg_catalog.text{types}) FROM PUBLIC;

-- name: node_call_rows
-- {params}: ", $2::pg_catalog.text, ..."; {columns}: the statement's columns, by position.
SELECT * FROM pg_temp.pgdurable_node($1::pg_catalog.text{params}) AS t({columns});

-- name: node_call_void
SELECT pg_temp.pgdurable_node($1::pg_catalog.text{params});

-- name: discard_tenant_state
-- What a tenant's statement may have left in the worker's session: temporary objects
-- (relations could shadow ours), SQL-level prepared statements (other tenants could read
-- them), settings and LISTENs (behind a transaction pooler the session serves others next).
DISCARD TEMP;
RESET ALL;
UNLISTEN *;
DO $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql LOOP
        EXECUTE format('DEALLOCATE %I', s.name);
    END LOOP;
END $$;

-- name: migration_lock
-- Migrations of one schema run one at a time (released at commit).
SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:migrate:' || $1));

-- name: create_schema_ddl
-- The DDL that creates schema $1 if it is missing (identifiers cannot be bind parameters).
SELECT format('CREATE SCHEMA IF NOT EXISTS %I', $1::text);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- name: migrations_table_exists
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: schema_version
SELECT max(version) FROM schema_migrations;

-- name: foreign_tables
-- Tables and views that are neither in the schemas of $1 (ours, the demos'), nor the system's,
-- nor an extension's: a database that has some holds someone's data (demo asks for --yes).
SELECT n.nspname || '.' || c.relname AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname <> ALL ($1::text[])
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname NOT LIKE 'pg\_toast\_temp\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
LIMIT $2;

-- ======================================================================================
-- Operations: /metrics and traces (pgdurable_async/_runtime/metrics.py and observer.py,
-- via _store/ops_store.py; schema 0016)
-- ======================================================================================

-- name: api_start_traced
-- start() that also records the caller's W3C trace context (JSON object) with the instance.
SELECT start($2, $3::text::jsonb, $1, $4::text::jsonb);

-- name: api_start_traced_deferred
-- api_start_traced whose start message does not NOTIFY (as api_start_deferred).
SELECT start($2, $3::text::jsonb, $1, $4::text::jsonb)
FROM (SELECT set_config('pgdurable.notify', 'deferred', true)) AS quiet;

-- name: metrics_snapshot
-- The database-wide gauges in one row, read at most once a second per process: each queue's
-- rows and the age of its oldest ready one (as the dashboard counts them), instances per
-- status, rows per flow queue, the oldest running activity (its worker reports when it
-- started), sessions of this database waiting on a lock, and the WAL position in bytes.
SELECT o.depth AS orchestrator_depth, o.age AS orchestrator_age,
       w.depth AS work_depth, w.age AS work_age,
       t.depth AS timers_depth, t.age AS timers_age,
       (SELECT coalesce(jsonb_object_agg(s.status, s.n), '{}')
        FROM (SELECT status, count(*) AS n FROM instances GROUP BY status) AS s)::text AS statuses,
       (SELECT coalesce(jsonb_object_agg(q.name, (SELECT count(*) FROM work_queue x WHERE x.queue = q.name)), '{}')
        FROM queues q)::text AS flow_depths,
       (SELECT coalesce(extract(epoch FROM now() - min(running_since)), 0) FROM workers)::float8 AS oldest_running,
       (SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND wait_event_type = 'Lock') AS lock_waits,
       coalesce(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
                - '0/0'::pg_lsn, 0)::float8 AS wal_bytes
FROM (SELECT count(*) AS depth, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age
      FROM orchestrator_queue) AS o,
     (SELECT count(*) AS depth,
             coalesce(extract(epoch FROM now() - min(visible_at) FILTER (WHERE visible_at <= now())), 0)::float8 AS age
      FROM work_queue) AS w,
     (SELECT count(*) AS depth,
             coalesce(extract(epoch FROM now() - min(fire_at) FILTER (WHERE fire_at <= now())), 0)::float8 AS age
      FROM timers) AS t;

-- name: trace_contexts
-- The trace context the spans of each instance join: its own, else its nearest ancestor's (a
-- child started by a turn has none of its own).  Instances without any are left out.
WITH RECURSIVE chain AS (
    SELECT i.instance_id AS origin, i.parent_instance_id AS parent, i.trace_context, 0 AS depth
    FROM instances i WHERE i.instance_id = ANY($1::text[])
    UNION ALL
    SELECT c.origin, p.parent_instance_id, p.trace_context, c.depth + 1
    FROM chain c JOIN instances p ON p.instance_id = c.parent
    WHERE c.trace_context IS NULL AND c.depth < 64
)
SELECT origin AS instance_id, trace_context::text AS trace_context FROM chain WHERE trace_context IS NOT NULL;

-- name: report_running
-- When this worker's longest-running activity started (NULL: none runs).
UPDATE workers SET running_since = $2 WHERE worker_id = $1;

-- ======================================================================================
-- The dashboard's read-only views (pgdurable_async/dashboard, via _store/dashboard_store.py)
-- ======================================================================================

-- name: dashboard_status_counts
SELECT status, count(*) AS n FROM instances GROUP BY status;

-- name: dashboard_queues
-- Depth of each queue; ready rows and the age of the oldest ready one (checkpoint age):
-- orchestrator messages are ready at once, work items once visible_at has passed (a
-- new item, a retry's backoff, or an expired lease), timers once due.
SELECT 'orchestrator' AS queue, count(*) AS depth, count(*) AS ready, 0::bigint AS running, 0::bigint AS delayed,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_ready_age,
       NULL::float8 AS next_due_in
FROM orchestrator_queue
UNION ALL
SELECT 'work', count(*), count(*) FILTER (WHERE visible_at <= now()),
       count(*) FILTER (WHERE visible_at > now() AND lease_token IS NOT NULL),
       count(*) FILTER (WHERE visible_at > now() AND lease_token IS NULL),
       coalesce(extract(epoch FROM now() - min(visible_at) FILTER (WHERE visible_at <= now())), 0)::float8,
       extract(epoch FROM min(visible_at) FILTER (WHERE visible_at > now() AND lease_token IS NULL) - now())::float8
FROM work_queue
UNION ALL
SELECT 'timers', count(*), count(*) FILTER (WHERE fire_at <= now()), 0, count(*) FILTER (WHERE fire_at > now()),
       coalesce(extract(epoch FROM now() - min(fire_at) FILTER (WHERE fire_at <= now())), 0)::float8,
       extract(epoch FROM min(fire_at) FILTER (WHERE fire_at > now()) - now())::float8
FROM timers;

-- name: dashboard_throughput
-- Facts per minute over the last $1 minutes (the BRIN index on recorded_at finds them).
SELECT date_trunc('minute', recorded_at) AS minute, event_type, count(*) AS n
FROM history
WHERE recorded_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
  AND event_type IN ('orchestration_started', 'orchestration_completed', 'orchestration_failed',
                     'activity_completed', 'activity_failed')
GROUP BY 1, 2;

-- name: dashboard_recent_failures
SELECT instance_id, name, error, updated_at FROM instances
WHERE status = 'failed'
ORDER BY updated_at DESC, instance_id
LIMIT $1;

-- name: dashboard_page
-- One page of instances, newest first, after the keyset cursor ($4, $5); $3 is an ILIKE
-- pattern on the id or the name.  Fetches one row more than the page, to know if there is a next.
SELECT instance_id, created_at FROM instances
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)
  AND ($3::text IS NULL OR instance_id ILIKE $3 OR name ILIKE $3)
  AND ($4::timestamptz IS NULL OR (created_at, instance_id) < ($4, $5::text))
ORDER BY created_at DESC, instance_id DESC
LIMIT $6;

-- name: dashboard_work_items
-- The live attempts of an instance's outstanding activities (retries happen in the queue).
SELECT task_id, attempt, visible_at, lease_token IS NOT NULL AND visible_at > now() AS running
FROM work_queue
WHERE instance_id = $1 AND execution_id = $2;

-- name: dashboard_now
SELECT now();
