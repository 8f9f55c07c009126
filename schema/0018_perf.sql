-- 0018: performance (issue 11).
--
-- claim_work: the claim of ready items without a queue (limited queues: claim_queued, 0015),
-- the statement of queries.sql's claim_work until now, as a function whose planner settings
-- keep it on an id-ordered index walk that stops after max_items rows.  As a plain statement its
-- plan followed the statistics: a queue that grew from empty to 100,000 items faster than
-- autovacuum's ANALYZE got a bitmap scan of every ready row and a sort, per claim (O(N) a claim,
-- O(N^2) a fan-out: the 100k fan-out ran at half the 10k rate).  Unchanged: oldest first per
-- activity name along (name, id); queue IS NULL only (num_nulls(queue) = 1, costed like the
-- visible_at test); SKIP LOCKED; the lease is now() + offset + lease_seconds with a new token.

-- Functions capture this search_path (SET search_path FROM CURRENT): pg_temp last (as from 0002 on).
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

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

-- notify_insert (0001), the statement trigger that NOTIFYs <schema>_<channel> on inserts into
-- orchestrator_queue, work_queue and schedules, stays silent in a transaction that set
-- pgdurable.notify to 'deferred' (set_config(..., true)): the runtime's turns, acks and its
-- client's starts do, and NOTIFY the same channels themselves right after their commit, from
-- a statement of its own that commits asynchronously.  A NOTIFY holds a database-wide lock
-- from the commit's start to its end, fsync included: every committing transaction that
-- notified waited for the one before it (starts topped out near 1,800/s on this machine
-- against 5,400/s without).  Any other writer (SQL clients, df, schedules) notifies as before.
CREATE OR REPLACE FUNCTION notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('pgdurable.notify', true) IS DISTINCT FROM 'deferred' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_' || TG_ARGV[0], '');
    END IF;
    RETURN NULL;
END $$;

-- create_instances (0008), the one home of "create an instance" (start(), child starts, df,
-- schedules), in plpgsql: a SQL function with SET clauses is planned again at every call, a
-- plpgsql one keeps its plan for the session (0.58 -> 0.47 ms per start() here).  Same
-- statement, same result rows, same privileges (CREATE OR REPLACE keeps them).
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
