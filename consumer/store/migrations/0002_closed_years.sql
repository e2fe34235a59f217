-- The closed-years watermark of `milestones prune` (engine_state.closed_through_year), made
-- binding in the database. Every writer also reads the watermark itself (the batch writer
-- every 30 s) and skips those sessions before the transaction; this guard covers the seconds in
-- between, so that once a closed year's ledger rows are gone nothing can count one of its
-- sessions again, not even a duplicate delivered to a writer holding an older watermark.
--
-- prune (re)creates the trigger `activity_ledger_closed_years` with the watermark in its WHEN
-- clause: rows of open years never call the function, so the batch path pays nothing.
-- Returning NULL from a BEFORE INSERT trigger skips the row (before ON CONFLICT is looked at):
-- the session is neither counted nor recorded, exactly as if the engine had skipped it.
CREATE FUNCTION milestones_skip_closed_year() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END
$$;

-- When the watermark last moved (shown by `milestones status`).
ALTER TABLE engine_state ADD COLUMN closed_at timestamptz;
