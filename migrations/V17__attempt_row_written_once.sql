-- hookbox schema, version 17: an attempt's row is written once, when the
-- attempt ends, and the event row has one index fewer.
--
-- The drain was bound by the database's CPU, and most of it went to writing
-- rows and their index entries (perf: index inserts alone were 30% of the
-- machine). Each event's attempt row was inserted by the claim (four index
-- entries) and updated by the outcome (a new version of the row and three
-- more). Now the claim writes the attempt in flight on the event's own row,
-- which it updates anyway, and the attempt's row is written once, with its
-- outcome, by the outcome (inbox_finish), the rescue of an expired lease or
-- a worker's release at shutdown: every attempt still leaves its row. An
-- attempt in flight is on the event row (attempt_id, attempt_started_at,
-- attempt_handler) and in inbox_event_timeline, as 'running'.
--
-- The attempt in flight's id is drawn from the attempts' sequence at the
-- claim. It is also the lease's token: an outcome is recorded only for the
-- claim whose attempt id the event row still holds, a check PostgreSQL makes
-- again on the row as it is now when another transaction changed it (the
-- open attempt row the outcome used to look up lay outside that re-check).
--
-- A handler's attempts in flight (for max_in_flight) are counted off the
-- event rows: an index of the processing events whose handler has limits
-- replaces the index of open attempt rows.
--
-- The event row's (source, received_at) index is dropped: every new version
-- of an event row (stored, claimed, finished) added an entry to it, and
-- listings page by id (time-ordered, drawn when the event is received).
--
-- inbox_attempts loses its foreign key to the event rows: PostgreSQL checked
-- it with a query per attempt row (3.7 us of the 76 us of database time a
-- drained event took). Attempt rows are written only by statements that hold
-- their event's row locked (the outcome, the rescue, the release), and
-- `hookbox prune` deletes an event's attempts with the event, as the key's
-- ON DELETE CASCADE did.
--
-- Measured with bench/run.sh, phase c (200,000 stored events, sql handler),
-- alternating runs: 20,348 and 20,336 events/s before; 25,547-26,255 with
-- the attempt row written once and the index dropped; 26,239-28,509 without
-- the foreign key as well (BENCHMARKS.md, "The attempt row written once").
--
-- Locks: ACCESS EXCLUSIVE on inbox_event_state and inbox_attempts for the
-- whole migration (the columns' defaults are constants: no row is
-- rewritten); the time is that of building the new index, a read of the
-- processing events only, and moving the attempts in flight (one row each).

LOCK TABLE inbox_event_state, inbox_attempts IN ACCESS EXCLUSIVE MODE;

ALTER TABLE inbox_event_state
    ADD COLUMN attempt_id         bigint,
    ADD COLUMN attempt_started_at timestamptz,
    ADD COLUMN attempt_handler    text,
    ADD COLUMN attempt_limited    boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN inbox_event_state.attempt_id IS
    'while processing: the id the attempt in flight''s row in inbox_attempts will have';
COMMENT ON COLUMN inbox_event_state.attempt_started_at IS
    'while processing: when the attempt in flight started';
COMMENT ON COLUMN inbox_event_state.attempt_handler IS
    'while processing: the handler the attempt in flight runs';
COMMENT ON COLUMN inbox_event_state.attempt_limited IS
    'while processing: the handler has flow limits (counted by inbox_events_in_flight_idx)';

-- Attempts in flight now: onto their event's row, their open row removed
-- (the outcome or the rescue writes it again, with the same id and start).
WITH moved AS (
    UPDATE inbox_event_state e
    SET attempt_id = a.id, attempt_started_at = a.started_at, attempt_handler = a.handler,
        attempt_limited = EXISTS (SELECT 1 FROM inbox_handler_state s WHERE s.handler = a.handler)
    FROM inbox_attempts a
    WHERE e.status = 'processing' AND a.event_id = e.id AND a.attempt = e.attempts AND a.finished_at IS NULL
    RETURNING a.id, a.started_at
)
DELETE FROM inbox_attempts a USING moved WHERE a.id = moved.id AND a.started_at = moved.started_at;

DROP INDEX inbox_attempts_in_flight_idx;
CREATE INDEX inbox_events_in_flight_idx ON inbox_event_state (attempt_handler)
    WHERE status = 'processing' AND attempt_limited;
DROP INDEX inbox_events_source_received_idx;
ALTER TABLE inbox_attempts DROP CONSTRAINT inbox_attempts_event_id_fkey;

-- An attempt in flight shows in the timeline as before, as 'running'.
CREATE OR REPLACE VIEW inbox_event_timeline AS
    SELECT d.event_id,
           d.received_at AS at,
           'delivery'::text AS kind,
           d.outcome,
           concat_ws(' ', 'HTTP ' || d.status_code, 'from ' || host(d.remote_addr), d.reason) AS detail
    FROM inbox_deliveries d
    WHERE d.event_id IS NOT NULL
  UNION ALL
    SELECT a.event_id,
           a.started_at,
           'attempt',
           coalesce(a.outcome, 'running'),
           concat_ws(' ', 'attempt ' || a.attempt, 'by ' || a.worker_id, 'handler ' || a.handler, a.error)
    FROM inbox_attempts a
  UNION ALL
    SELECT e.id,
           e.attempt_started_at,
           'attempt',
           'running',
           concat_ws(' ', 'attempt ' || e.attempts, 'by ' || e.locked_by, 'handler ' || e.attempt_handler)
    FROM inbox_event_state e
    WHERE e.status = 'processing' AND e.attempt_id IS NOT NULL
  UNION ALL
    SELECT link.event_id,
           action.at,
           'action',
           action.action,
           concat_ws(' ', 'by ' || action.actor, 'reason: ' || action.reason)
    FROM inbox_action_events link
    JOIN inbox_actions action ON action.id = link.action_id;

-- The claim: the attempt in flight on the event row, not an attempt row.
-- Otherwise version 13's body, with its settings and version 14's
-- random_page_cost restated (CREATE OR REPLACE sets a function's settings
-- anew).
CREATE OR REPLACE FUNCTION inbox_claim(
    p_worker          text,
    p_limit           integer,
    p_lease_secs      double precision,
    p_sources         text[],
    p_route_pos       integer[],
    p_route_source    text[],
    p_route_pattern   text[],             -- a LIKE pattern; NULL matches every type
    p_route_handler   text[],
    p_limit_handler   text[],
    p_max_in_flight   integer[],          -- NULL: no limit
    p_rate            double precision[], -- per second; NULL: no limit
    p_burst           double precision[],
    p_has_circuit     boolean[]
) RETURNS TABLE (
    id uuid, source text, event_key text, event_type text, attempts integer,
    payload bytea, payload_is_json boolean, attempt_id bigint, attempt_started_at timestamptz,
    handler text, stale boolean
) LANGUAGE plpgsql
-- As version 11's: one cached generic plan per statement.
SET plan_cache_mode = force_generic_plan
-- A claim is a short statement whose estimated cost can still pass
-- jit_above_cost (a hot key's queue): compiling it would cost more than
-- running it, at every call.
SET jit = off
-- Version 14: the rows it reads are in memory (the head of the due index and
-- the rows its first step has just locked).
SET random_page_cost = 1.1
AS $$
#variable_conflict use_column
DECLARE
    candidate_ids      uuid[];
    candidate_handlers text[];
    key_sources        text[];
    key_names          text[];
    locked_sources     text[] := '{}';
    locked_keys        text[] := '{}';
    needed             text[];
    allowance jsonb := '{}';   -- handler -> events it may start now (absent: no limit)
    available jsonb := '{}';   -- handler -> tokens in its bucket now
    probing   text[] := '{}';  -- handlers whose next start is the circuit's probe
BEGIN
    -- 1. Candidates.
    SELECT coalesce(array_agg(c.id ORDER BY c.next_attempt_at, c.id), '{}'),
           coalesce(array_agg(c.handler ORDER BY c.next_attempt_at, c.id), '{}'),
           coalesce(array_agg(c.source) FILTER (WHERE c.ordering_key IS NOT NULL), '{}'),
           coalesce(array_agg(c.ordering_key) FILTER (WHERE c.ordering_key IS NOT NULL), '{}')
    INTO candidate_ids, candidate_handlers, key_sources, key_names
    FROM (
        SELECT e.id, e.next_attempt_at, e.source, e.ordering_key, route.handler
        FROM inbox_event_state e
        LEFT JOIN LATERAL (
            SELECT r.handler
            FROM unnest(p_route_pos, p_route_source, p_route_pattern, p_route_handler)
                 AS r(pos, source, pattern, handler)
            WHERE r.source = e.source AND (r.pattern IS NULL OR e.event_type LIKE r.pattern)
            ORDER BY r.pos
            LIMIT 1
        ) route ON true
        WHERE e.status IN ('pending', 'retrying') AND e.next_attempt_at <= now()
          AND e.source = ANY(p_sources)
          AND NOT EXISTS (SELECT 1 FROM inbox_pauses p WHERE p.kind = 'source' AND p.name = e.source)
          AND (route.handler IS NULL OR NOT EXISTS (
                  SELECT 1 FROM inbox_pauses p WHERE p.kind = 'handler' AND p.name = route.handler))
          -- The first unfinished event of its key, and nothing of its key in
          -- flight: two probes, each the first entry of an index (the ordering
          -- index in key order, the one-in-flight index), however many of the
          -- key wait behind it. (Written as "nothing earlier", the planner may
          -- scan every event of a hot key for each candidate.)
          AND (e.ordering_key IS NULL OR (
                  e.id = (
                      SELECT p.id FROM inbox_event_state p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key
                        AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
                      ORDER BY p.ordered_at, p.ordering_seq
                      LIMIT 1)
                  AND NOT EXISTS (
                      SELECT 1 FROM inbox_event_state p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key AND p.status = 'processing')))
        ORDER BY e.next_attempt_at, e.id
        LIMIT p_limit
        FOR UPDATE OF e SKIP LOCKED
    ) c;

    IF cardinality(candidate_ids) = 0 THEN
        PERFORM inbox_park_waiting(p_sources);
        RETURN;
    END IF;

    -- 2. Ordering keys.
    IF cardinality(key_names) > 0 THEN
        INSERT INTO inbox_ordering_locks (source, ordering_key)
        SELECT DISTINCT k.source, k.ordering_key FROM unnest(key_sources, key_names) AS k(source, ordering_key)
        ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
        SELECT coalesce(array_agg(l.source), '{}'), coalesce(array_agg(l.ordering_key), '{}')
        INTO locked_sources, locked_keys
        FROM (
            SELECT o.source, o.ordering_key FROM inbox_ordering_locks o
            JOIN (SELECT DISTINCT * FROM unnest(key_sources, key_names) AS k(source, ordering_key)) k
              ON k.source = o.source AND k.ordering_key = o.ordering_key
            ORDER BY o.source, o.ordering_key
            FOR UPDATE OF o SKIP LOCKED
        ) l;
    END IF;

    -- 3. Limited handlers among the candidates.
    needed := ARRAY(SELECT DISTINCT h FROM unnest(candidate_handlers) AS h
                    WHERE h = ANY(p_limit_handler) ORDER BY h);
    IF cardinality(needed) > 0 THEN
        INSERT INTO inbox_handler_state (handler)
        SELECT unnest(needed) ON CONFLICT DO NOTHING;
        PERFORM 1 FROM inbox_handler_state s
        WHERE s.handler = ANY(needed) ORDER BY s.handler FOR UPDATE;

        WITH limits AS (
            SELECT * FROM unnest(p_limit_handler, p_max_in_flight, p_rate, p_burst, p_has_circuit)
                     AS l(handler, max_in_flight, rate, burst, has_circuit)
            WHERE l.handler = ANY(needed)
        ), state AS (
            SELECT l.*, s.circuit,
                   CASE WHEN l.rate IS NULL THEN NULL
                        ELSE least(l.burst, coalesce(s.tokens, l.burst)
                                   + l.rate * extract(epoch FROM clock_timestamp() - coalesce(s.tokens_at, clock_timestamp())))
                   END AS tokens,
                   -- The handler's attempts in flight, off the state rows
                   -- (the in-flight index): an attempt's own row is written
                   -- when it ends.
                   (SELECT count(*) FROM inbox_event_state f
                     WHERE f.status = 'processing' AND f.attempt_limited
                       AND f.attempt_handler = l.handler) AS in_flight,
                   (s.circuit = 'open' AND s.open_until <= clock_timestamp())
                   OR (s.circuit = 'half_open' AND NOT EXISTS (
                          SELECT 1 FROM inbox_event_state e
                          WHERE e.id = s.probe_event AND e.status = 'processing')) AS probe_due
            FROM limits l JOIN inbox_handler_state s ON s.handler = l.handler
        ), allowed AS (
            SELECT handler, tokens, probe_due AND has_circuit AS probe_due,
                   greatest(0, least(
                       CASE WHEN max_in_flight IS NULL THEN p_limit ELSE max_in_flight - in_flight END,
                       CASE WHEN tokens IS NULL THEN p_limit ELSE floor(tokens)::int END,
                       CASE WHEN NOT has_circuit OR circuit = 'closed' THEN p_limit
                            WHEN probe_due THEN 1
                            ELSE 0 END)) AS n
            FROM state
        )
        SELECT coalesce(jsonb_object_agg(a.handler, a.n), '{}'),
               coalesce(jsonb_object_agg(a.handler, a.tokens) FILTER (WHERE a.tokens IS NOT NULL), '{}'),
               coalesce(array_agg(a.handler) FILTER (WHERE a.probe_due AND a.n > 0), '{}')
        INTO allowance, available, probing
        FROM allowed a;
    END IF;

    -- 4. Decide again, with what every lock above guards, and claim.
    RETURN QUERY
    WITH candidate AS (
        SELECT c.id, c.handler, c.position
        FROM unnest(candidate_ids, candidate_handlers) WITH ORDINALITY AS c(id, handler, position)
    ), checked AS (
        SELECT c.id, c.handler, c.position,
               coalesce(e.skip_if_stale AND EXISTS (
                   SELECT 1 FROM inbox_event_state f
                   WHERE f.source = e.source AND f.ordering_key = e.ordering_key
                     AND f.status IN ('succeeded', 'skipped') AND f.ordered_at > e.ordered_at), false) AS stale
        FROM candidate c JOIN inbox_event_state e ON e.id = c.id
        -- Inside CASE, so that it does not match the due index's predicate:
        -- a cached generic plan made when nothing was pending otherwise
        -- walks that index (every pending event) for each candidate.
        WHERE CASE WHEN e.status IN ('pending', 'retrying') THEN true ELSE false END
          AND (e.ordering_key IS NULL OR (
                  EXISTS (SELECT 1 FROM unnest(locked_sources, locked_keys) AS k(source, ordering_key)
                          WHERE k.source = e.source AND k.ordering_key = e.ordering_key)
                  AND e.id = (
                      SELECT p.id FROM inbox_event_state p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key
                        AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
                      ORDER BY p.ordered_at, p.ordering_seq
                      LIMIT 1)
                  AND NOT EXISTS (
                      SELECT 1 FROM inbox_event_state p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key AND p.status = 'processing')))
    ), admitted AS (
        SELECT c.id, c.handler, c.stale
        FROM (SELECT c.*, row_number() OVER (PARTITION BY c.handler ORDER BY c.position) AS n
              FROM checked c) c
        WHERE c.handler IS NULL OR NOT (allowance ? c.handler) OR c.n <= (allowance ->> c.handler)::int
    ), claimed AS (
        UPDATE inbox_event_state e
        SET status = 'processing', attempts = e.attempts + 1, locked_by = p_worker,
            locked_until = now() + make_interval(secs => p_lease_secs),
            -- The attempt in flight: its row's id and start, written to
            -- inbox_attempts when it ends (inbox_finish), or by the rescue.
            attempt_id = nextval('inbox_attempts_id_seq'), attempt_started_at = now(),
            attempt_handler = admitted.handler,
            attempt_limited = coalesce(admitted.handler = ANY(p_limit_handler), false)
        FROM admitted WHERE e.id = admitted.id
        RETURNING e.id, e.source, e.event_key, e.event_type, e.attempts, e.legacy_payload,
                  e.legacy_payload_json IS NOT NULL AS legacy_payload_json, admitted.handler, admitted.stale,
                  e.attempt_id, e.attempt_started_at
    ), started AS (
        SELECT c.handler, count(*) AS n, min(c.id::text)::uuid AS first_event
        FROM claimed c WHERE c.handler IS NOT NULL GROUP BY c.handler
    ), state_changed AS (
        -- One UPDATE per handler row: tokens spent and the probe together.
        UPDATE inbox_handler_state s
        SET tokens = CASE WHEN available ? s.handler
                          THEN (available ->> s.handler)::double precision - st.n ELSE s.tokens END,
            tokens_at = CASE WHEN available ? s.handler THEN clock_timestamp() ELSE s.tokens_at END,
            circuit = CASE WHEN s.handler = ANY(probing) THEN 'half_open' ELSE s.circuit END,
            probe_event = CASE WHEN s.handler = ANY(probing) THEN st.first_event ELSE s.probe_event END
        FROM started st
        WHERE s.handler = st.handler AND (available ? s.handler OR s.handler = ANY(probing))
        RETURNING s.handler, s.probe_event, s.handler = ANY(probing) AS probed
    ), probe_recorded AS (
        INSERT INTO inbox_circuit_events (handler, change, event_id, reason)
        SELECT p.handler, 'probe', p.probe_event, 'cool-down over: one attempt to test the downstream'
        FROM state_changed p WHERE p.probed
    )
    SELECT c.id, c.source, c.event_key, c.event_type, c.attempts,
           coalesce(c.legacy_payload, p.payload),
           c.legacy_payload_json OR p.payload_json IS NOT NULL OR coalesce(p.payload_is_json, false),
           c.attempt_id, c.attempt_started_at, c.handler, c.stale
    FROM claimed c
    LEFT JOIN inbox_payloads p ON p.event_id = c.id;

    -- Fewer candidates than asked for: the scan of step 1 went through every
    -- due event, including those waiting behind another event of their key,
    -- and the next claim would again. Set them aside; last, so that this
    -- claim waits for nothing while it holds their row locks.
    IF cardinality(candidate_ids) < p_limit THEN
        PERFORM inbox_park_waiting(p_sources);
    END IF;
END;
$$;

-- The outcome: the attempt's row inserted with it. Otherwise version 15's
-- function (its settings are restated).
CREATE OR REPLACE FUNCTION inbox_finish(
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
            last_error = o.error, locked_by = NULL, locked_until = NULL,
            attempt_id = NULL, attempt_started_at = NULL, attempt_handler = NULL, attempt_limited = false
        FROM outcome o, at
        -- Still this claim's: the lease, and the attempt in flight is this
        -- claim's (its id is drawn from a sequence, so a newer claim of the
        -- same event by the same worker, after a rescue and a replay, has
        -- another). All of it is on the row being updated, so PostgreSQL
        -- re-checks it on the row as it is now when another transaction
        -- changed it meanwhile. Inside CASE so that the plan stays on the
        -- primary key: written plainly the lease conditions match the lease
        -- index's predicate.
        WHERE e.id = o.event_id
          AND CASE WHEN e.status = 'processing' AND e.locked_by = p_worker AND e.attempts = o.attempt
                        AND e.attempt_id = o.attempt_id
                   THEN true ELSE false END
        RETURNING e.id, e.source, e.ordering_key,
                  e.status IN ('succeeded', 'skipped') OR (e.status = 'dead' AND NOT e.dead_blocks) AS frees_key,
                  o.attempt, o.attempt_id, o.attempt_started_at, o.attempt_outcome, o.handler, o.error, at.t
    ), written AS (
        -- The attempt's row, written once, with its outcome.
        INSERT INTO inbox_attempts (id, event_id, attempt, worker_id, handler, started_at, finished_at, outcome, error)
        SELECT event.attempt_id, event.id, event.attempt, p_worker, event.handler, event.attempt_started_at,
               event.t, event.attempt_outcome, event.error
        FROM event
    )
    SELECT event.source, event.ordering_key, event.frees_key FROM event;
END;
$$;
