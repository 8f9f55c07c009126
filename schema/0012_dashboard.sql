-- pgdurable_async, version 12: what an instance waits on, and a cheap recent-activity scan.
--   * instances.event_waits: what the code waits on that history cannot say, after its last
--     turn: the wait_for_event calls blocked ({events: [{name, since, until?, timer?}]}) and
--     the timers that are only event timeouts ({timers: [task ids]}); NULL for neither.  A
--     wait is no command; the other waits (activities, timers, children) are read from
--     history, where they are commands without a completion.
--   * history_recorded_brin: the dashboard's throughput of the last minutes reads recent
--     history by recorded_at.  History is appended in time order, so a BRIN index is tiny
--     and costs the hot path next to nothing (a btree would cost every insert).
ALTER TABLE instances ADD COLUMN IF NOT EXISTS event_waits jsonb;
CREATE INDEX IF NOT EXISTS history_recorded_brin ON history USING brin (recorded_at);
