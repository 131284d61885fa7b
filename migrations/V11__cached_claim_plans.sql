-- hookbox schema, version 11: the claim and the wake plan their statements
-- once per connection; the park, at every call.
--
-- Measured with one hot key (bench/run.sh, phase k, pg_stat_statements with
-- track = all and track_planning): of the 4.1 ms a claim took, 2.5 ms were
-- planning, and each wake planned for 0.4 ms. PL/pgSQL caches its
-- statements' plans but chose a new custom plan at every call for the
-- claim's steps 2 to 4 (their generic plan's estimate, with arrays as
-- parameters, looked worse than it is), and a LANGUAGE sql function that
-- updates is never inlined: it plans its body at every call.
--
-- Now every statement of the claim and the wake runs its connection's
-- cached generic plan: steps 2 to 4 and the wake start from arrays of ids
-- or keys, one plan fits every call; step 1 already ran its generic plan
-- (its custom plans were slower). The park is the exception, on purpose: a
-- generic plan cannot see how many events are due and chose a sequential
-- scan of the whole table, where its custom plan walks the due index.
--
-- Locks: replaces two functions and sets an option of a third; no table is
-- touched.

ALTER FUNCTION inbox_claim(text, integer, double precision, text[], integer[], text[], text[], text[],
                           text[], integer[], double precision[], double precision[], boolean[])
    SET plan_cache_mode = force_generic_plan;

CREATE OR REPLACE FUNCTION inbox_park_waiting(p_sources text[]) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    UPDATE inbox_event_state e
    -- As long as it has waited so far, from 10 s up to a minute: a key with a
    -- long queue is not walked again every few seconds.
    SET next_attempt_at = clock_timestamp()
        + least(interval '1 minute', greatest(interval '10 seconds', clock_timestamp() - e.received_at))
    -- By primary key (= ANY of an array), never a join against a scan of the table.
    WHERE e.id = ANY(ARRAY(
        SELECT w.id FROM inbox_event_state w
        WHERE w.status = 'pending' AND w.next_attempt_at <= now()
          AND w.ordering_key IS NOT NULL AND w.source = ANY(p_sources)
          AND NOT EXISTS (SELECT 1 FROM inbox_pauses p WHERE p.kind = 'source' AND p.name = w.source)
          -- Probes of the ordering index, one per event (written as EXISTS,
          -- the planner may hash a hot key's events against each other).
          AND w.id <> ALL (ARRAY(
              SELECT p.id FROM inbox_event_state p
              WHERE p.source = w.source AND p.ordering_key = w.ordering_key
                AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
              ORDER BY p.ordered_at, p.ordering_seq
              LIMIT 2))
        ORDER BY w.next_attempt_at, w.id
        LIMIT 10000
        FOR NO KEY UPDATE SKIP LOCKED));
END;
$$;

CREATE OR REPLACE FUNCTION inbox_wake_next(p_sources text[], p_keys text[]) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    UPDATE inbox_event_state n SET next_attempt_at = clock_timestamp()
    WHERE n.id = ANY(ARRAY(
            SELECT first.id
            FROM (SELECT DISTINCT k.source, k.ordering_key
                  FROM unnest(p_sources, p_keys) AS k(source, ordering_key)) k,
            LATERAL (SELECT o.id FROM inbox_event_state o
                     WHERE o.source = k.source AND o.ordering_key = k.ordering_key
                       AND (o.status IN ('pending', 'processing', 'retrying') OR (o.status = 'dead' AND o.dead_blocks))
                     ORDER BY o.ordered_at, o.ordering_seq
                     LIMIT 2) first))
      AND n.status = 'pending' AND n.next_attempt_at > clock_timestamp();
END;
$$;
