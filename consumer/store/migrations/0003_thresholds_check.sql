-- milestone_thresholds.thresholds must be a flat array of positive integers without NULL
-- elements (or empty: no milestones for that organization). `0 < ALL (thresholds)` of 0001
-- lets a NULL element through (the comparison is NULL, and a CHECK only refuses false) and
-- says nothing about dimensions, and the engine stopped every batch on such a row.
--
-- Existing rows that break the rule are repaired, not deleted: the organization chose its own
-- thresholds, and deleting the row would apply the default ones, whose notifications could not
-- be taken back. The repair keeps what the row meant: its elements flattened, without NULLs,
-- sorted and without repeats (a row of only NULLs becomes empty: no milestones). A lower bound
-- other than 1 ('[0:1]={50,100}') is renumbered from 1. Each repaired row's original value is
-- kept in milestone_thresholds_repaired, for the operator to check.
CREATE TABLE milestone_thresholds_repaired (
    organization_id uuid NOT NULL,
    original        int[] NOT NULL,
    repaired        int[] NOT NULL,
    repaired_at     timestamptz NOT NULL DEFAULT now()
);

-- The rule, as the CHECK below states it. CASE, not AND: array_position refuses a nested array.
CREATE FUNCTION milestones_thresholds_usable(thresholds int[]) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE
        WHEN cardinality(thresholds) = 0 THEN true
        WHEN array_ndims(thresholds) <> 1 OR array_lower(thresholds, 1) <> 1 THEN false
        ELSE array_position(thresholds, NULL) IS NULL
    END
$$;

WITH bad AS (
    SELECT organization_id, thresholds FROM milestone_thresholds
    WHERE NOT milestones_thresholds_usable(thresholds)
    FOR UPDATE
), repaired AS (
    INSERT INTO milestone_thresholds_repaired (organization_id, original, repaired)
    SELECT organization_id, thresholds,
           ARRAY(SELECT DISTINCT v FROM unnest(thresholds) AS v WHERE v IS NOT NULL ORDER BY v)
    FROM bad
    RETURNING organization_id, repaired
)
UPDATE milestone_thresholds t SET thresholds = r.repaired
FROM repaired r WHERE r.organization_id = t.organization_id;

ALTER TABLE milestone_thresholds
    ADD CONSTRAINT thresholds_flat_without_nulls CHECK (milestones_thresholds_usable(thresholds));
