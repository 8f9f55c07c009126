-- pgdurable_async, version 6: history rows go only with their whole instance (purge).
-- Before, a finished instance's history could lose single rows while the instance
-- remained; now a history row can be deleted only once its instance row is gone, and an
-- instance row only once the instance has finished.
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
    IF OLD.status NOT IN ('completed', 'failed', 'cancelled', 'terminated') THEN
        RAISE EXCEPTION 'pgdurable instance % is %: only finished instances can be deleted', OLD.instance_id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END $$;

DROP TRIGGER IF EXISTS instances_delete_guard ON instances;
CREATE TRIGGER instances_delete_guard BEFORE DELETE ON instances
    FOR EACH ROW EXECUTE FUNCTION instance_delete_guard();
