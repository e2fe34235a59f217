-- Why a suppressed milestone was suppressed (NULL for pending and published rows, and for
-- rows suppressed before this column existed). Written by whoever suppresses: the batch and
-- the sweep at record time, the publisher's opt-out check just before sending.
ALTER TABLE scenario_notifications
    ADD COLUMN suppressed_reason text
    CONSTRAINT suppressed_reason_known CHECK (suppressed_reason IN (
        'opted_out',              -- opted out when the milestone was recorded
        'grace_period_over',      -- a past year's milestone, recorded after its grace period
        'replay_no_notify',       -- reached by a session older than a `replay --no-notify`
        'opted_out_before_send',  -- recorded pending, opted out before the publisher sent it
        'operator'                -- set by hand
    ));

-- When an organization's thresholds were last changed (by `milestones thresholds` or the
-- thresholds topic); NULL for a row written by hand. Restoring from the topic applies a
-- change only when it is newer than what the database knows.
ALTER TABLE milestone_thresholds ADD COLUMN changed_at timestamptz DEFAULT now();

-- Every change of an organization's thresholds, with the value it replaced. `thresholds` NULL:
-- the row was removed (the default applies again); `previous` NULL: there was no row.
CREATE TABLE milestone_thresholds_history (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id uuid NOT NULL,
    thresholds      int[],
    previous        int[],
    changed_at      timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    source          text NOT NULL CHECK (source IN ('command', 'topic'))
);
-- thresholds list/history, and the restore's "latest change known" per organization.
CREATE INDEX milestone_thresholds_history_org
    ON milestone_thresholds_history (organization_id, changed_at);
