-- pgdurable_async, version 10: worker liveness without a LISTEN session.
-- A worker with wake="poll" (behind a transaction-pooling pooler such as PgBouncer) has no
-- session of its own: the backend that ran its last statement serves other clients next, so
-- pg_stat_activity cannot tell whether the worker lives.  Such a worker registers with
-- backend_pid NULL and renews expires_at with a heartbeat; release_dead_leases frees the
-- leases of a worker whose heartbeat expired.  LISTEN workers keep backend_pid and leave
-- expires_at NULL.
ALTER TABLE workers ALTER COLUMN backend_pid DROP NOT NULL;
ALTER TABLE workers ADD COLUMN IF NOT EXISTS expires_at timestamptz;
COMMENT ON COLUMN workers.expires_at IS
    'wake="poll" workers (backend_pid NULL): dead once this has passed without a heartbeat';
