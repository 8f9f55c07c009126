-- pgdurable_async, the first hour (issue 12): df.cancel says what really happened.
--   * df.cancel on an instance that has already finished changes nothing, and now says so
--     ('Instance <id> already completed: nothing to cancel') instead of claiming to have
--     cancelled it.  On a live instance it is 0014's: the request is recorded, the instance
--     is marked cancelled at once, and the text is pg_durable's.  CREATE OR REPLACE keeps
--     the function's grants.
SELECT set_config('search_path', current_schema() || ', pg_temp', true);

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
