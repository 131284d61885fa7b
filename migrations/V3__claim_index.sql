-- hookbox schema, version 3: the claim's index matches its ORDER BY.
-- Claims read due events ordered by (next_attempt_at, id). With the V1 index on
-- next_attempt_at alone, events sharing one next_attempt_at (a bulk import, a
-- replay, a burst) had to be sorted in full on every claim.
DROP INDEX inbox_events_due_idx;
CREATE INDEX inbox_events_due_idx ON inbox_events (next_attempt_at, id)
    WHERE status IN ('pending', 'retrying');
