-- pgdurable_async, version 4: cheaper activity claims.
-- Claims walk (name, id) and filter on visible_at, so the lease UPDATE (which only
-- changes visible_at, lease_token, lease_owner: none of them indexed) is a HOT update;
-- fillfactor leaves the page room those in-place updates need.
CREATE INDEX IF NOT EXISTS work_queue_fifo ON work_queue (name, id);
DROP INDEX IF EXISTS work_queue_claim;
ALTER TABLE work_queue SET (fillfactor = 50);
