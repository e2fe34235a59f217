-- How far each replay group's reading is held by this database: per input partition, the
-- offset below which the effects of every record are committed here. `milestones replay`
-- writes it right after each batch's transaction and before the batch's Kafka offset commit,
-- so in a running system it is never behind the group's committed offsets. A database that is
-- fresh, or restored from a backup, holds less than the group has committed: a plain `replay`
-- (resuming from the group's offsets) compares the two and refuses, instead of silently
-- rebuilding only the part of the history after those offsets. A backup is a consistent
-- snapshot, so a row here never claims effects the snapshot lacks.
CREATE TABLE replay_positions (
    group_id    text NOT NULL,
    topic       text NOT NULL,
    partition   int NOT NULL,
    next_offset bigint NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
