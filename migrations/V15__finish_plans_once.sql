-- hookbox schema, version 15: the outcome of a claim is recorded by a
-- function that runs one cached generic plan per connection, as the claim
-- does (versions 11 and 14).
--
-- The worker sent this statement itself, and PostgreSQL planned its first
-- five executions on each connection with the arrays' real lengths: for 500
-- outcomes it chose to read the whole state table and the open attempts
-- partition into hash tables (40-100 ms a batch with 100,000 events stored,
-- growing with the table), five times for each of the worker's connections,
-- before a cached plan was tried. The generic plan it then kept depended on
-- the statistics of the moment: one of them joined the recorded events to
-- the outcomes in a nested loop (500 x 500 comparisons).
--
-- Here each step starts from the outcomes and reaches every row by its
-- primary key, and the attempt rows are updated from what the event update
-- returns (no second join of the outcomes). Its results are those of the
-- statement it replaces, with one fix: an outcome whose attempt row was
-- closed while the statement ran (a rescue) is not counted as recorded (see
-- below), so the worker rolls the batch back.
--
-- Locks: creates a function; no table is touched.

CREATE FUNCTION inbox_finish(
    p_worker             text,
    p_event_ids          uuid[],
    p_attempt_ids        bigint[],
    p_attempt_started_at timestamptz[],
    p_attempts           integer[],
    p_event_status       text[],
    p_attempt_outcome    text[],
    p_handler            text[],
    p_error              text[],
    p_retry_in           double precision[], -- seconds until a retrying event is due
    p_not_started        boolean[]
) RETURNS TABLE (source text, ordering_key text, frees_key boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
SET random_page_cost = 1.1
-- Every row it reads has a primary key to reach it by. A connection keeps
-- its plan for as long as it lives, and a plan made while the attempts
-- partition of the day was empty (vacuumed, or made ahead) scanned that
-- partition once per outcome, which looked free: once the day's attempts
-- filled it, a batch of 500 read it 500 times over (10 million rows), until
-- something invalidated the plan.
SET enable_seqscan = off
-- For the same reason, every join is a nested loop over key look-ups: a plan
-- made while the tables were tiny (a new installation) read whole tables
-- into hash joins or a materialized scan, once per batch, and kept doing so
-- as they grew.
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_material = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH outcome AS (
        SELECT * FROM unnest(p_event_ids, p_attempt_ids, p_attempt_started_at, p_attempts, p_event_status,
                             p_attempt_outcome, p_handler, p_error, p_retry_in, p_not_started)
                 AS o(event_id, attempt_id, attempt_started_at, attempt, event_status,
                      attempt_outcome, handler, error, retry_in, not_started)
    ), at AS (
        -- The moment each outcome is recorded, shared by its two rows.
        SELECT clock_timestamp() AS t
    ), event AS (
        UPDATE inbox_event_state e
        SET status = o.event_status,
            attempts = e.attempts - CASE WHEN o.not_started THEN 1 ELSE 0 END,
            processed_at = CASE WHEN o.event_status IN ('succeeded', 'skipped', 'dead') THEN at.t END,
            next_attempt_at = CASE WHEN o.retry_in IS NULL THEN e.next_attempt_at
                                   ELSE at.t + make_interval(secs => o.retry_in) END,
            last_error = o.error, locked_by = NULL, locked_until = NULL
        FROM outcome o, at
        -- The lease conditions sit inside CASE so that the plan stays on the
        -- primary key: written plainly they match the lease index's
        -- predicate. The open-attempt check too: plainly it matches the
        -- in-flight attempt index, and each look-up walks every attempt in
        -- flight (version 4).
        WHERE e.id = o.event_id
          AND CASE WHEN e.status = 'processing' AND e.locked_by = p_worker AND e.attempts = o.attempt
                        -- This claim's own attempt row, still open: after a rescue and
                        -- a replay, the same worker may hold a newer claim with the
                        -- same attempt number.
                        AND EXISTS (SELECT 1 FROM inbox_attempts a
                                    WHERE a.id = o.attempt_id AND a.started_at = o.attempt_started_at
                                      AND a.event_id = e.id
                                      AND CASE WHEN a.finished_at IS NULL THEN true ELSE false END)
                   THEN true ELSE false END
        RETURNING e.id, e.source, e.ordering_key,
                  e.status IN ('succeeded', 'skipped') OR (e.status = 'dead' AND NOT e.dead_blocks) AS frees_key,
                  o.attempt_id, o.attempt_started_at, o.attempt_outcome, o.handler, o.error, at.t
    )
    UPDATE inbox_attempts a
    SET finished_at = event.t, outcome = event.attempt_outcome, handler = event.handler, error = event.error
    FROM event
    WHERE a.id = event.attempt_id AND a.started_at = event.attempt_started_at
      -- Still open, checked again on the row as it is now. The event update
      -- above re-checks a row changed since this statement began against the
      -- statement's snapshot of the attempts: if a rescue, a replay and a new
      -- claim by this worker (same attempt number) landed meanwhile, this
      -- claim's attempt row still looks open there. Here it is seen closed
      -- (by the rescue), the event goes uncounted, and the worker rolls back
      -- instead of recording a stale outcome over the new claim.
      AND CASE WHEN a.finished_at IS NULL THEN true ELSE false END
    RETURNING event.source, event.ordering_key, event.frees_key;
END;
$$;
