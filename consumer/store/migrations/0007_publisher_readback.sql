-- The publisher's read-back after a restore, and an operator's re-send.
--
-- A row set back to `pending` by hand (the operator's repair) is to be emitted again. Until the
-- publisher hands it to the producer, a copy of it already on the topic is the earlier
-- emission, not the outcome of a send in doubt, so the read-back must not settle the row with
-- it. The trigger marks such a row (and forgets where it was published); the publisher clears
-- the mark in the statement that picks the row for sending, before the send.
ALTER TABLE scenario_notifications
    ADD COLUMN awaiting_resend boolean NOT NULL DEFAULT false;

CREATE FUNCTION scenario_notifications_repend() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.awaiting_resend := true;
    NEW.published_at := NULL;
    NEW.published_partition := NULL;
    NEW.published_offset := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER scenario_notifications_repend
    BEFORE UPDATE OF status ON scenario_notifications
    FOR EACH ROW
    WHEN (OLD.status <> 'pending' AND NEW.status = 'pending')
    EXECUTE FUNCTION scenario_notifications_repend();

-- Notifications the read-back found on the topic that have no record (the database was
-- restored from a backup older than the topic). Kept here instead of holding the read
-- positions back before them: a record written later with one of these ids (by a replay) is
-- marked published from here instead of being sent again, and the entry is removed.
CREATE TABLE publisher_unrecorded (
    notification_id uuid PRIMARY KEY,
    topic           text NOT NULL,
    partition       int NOT NULL,
    "offset"        bigint NOT NULL,
    found_at        timestamptz NOT NULL DEFAULT now()
);
