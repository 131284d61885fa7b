-- hookbox schema, version 9: ordered events waiting for their key are set
-- aside instead of being examined again by every claim.
--
-- With one hot key and thousands of its events waiting, every claim walked all
-- of them (each one "is anything of its key ahead of me?") to find the one
-- that may run: tens of milliseconds between one event of the key and the
-- next. Now a claim that finds fewer events than it asked for moves the
-- waiting ones' next_attempt_at 10 s to a minute ahead (all but the first two of each
-- key), and the completion that frees a key makes its next ones due at once.
--
-- Locks: replaces a function; no table is touched.

-- Sets aside (next_attempt_at 10 s to a minute ahead) the due ordered events of
-- p_sources that wait behind at least two unfinished events of their key.
-- The first two of a key are never set aside: when the first finishes, the
-- second is already due, and the wake (inbox_wake_next) makes the new second
-- due in the same transaction; a park working from a snapshot taken before
-- that completion committed can only set aside an event that is then second,
-- never the one that may run. Row locks are NO KEY UPDATE and skip what is
-- locked, so a receiver recording a duplicate (a key-share lock) never waits.
-- Paused sources are left alone: nothing of theirs is claimed anyway.
CREATE FUNCTION inbox_park_waiting(p_sources text[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE inbox_events e
    -- As long as it has waited so far, from 10 s up to a minute: a key with a
    -- long queue is not walked again every few seconds.
    SET next_attempt_at = clock_timestamp()
        + least(interval '1 minute', greatest(interval '10 seconds', clock_timestamp() - e.received_at))
    -- By primary key (= ANY of an array), never a join against a scan of the table.
    WHERE e.id = ANY(ARRAY(
        SELECT w.id FROM inbox_events w
        WHERE w.status = 'pending' AND w.next_attempt_at <= now()
          AND w.ordering_key IS NOT NULL AND w.source = ANY(p_sources)
          AND NOT EXISTS (SELECT 1 FROM inbox_pauses p WHERE p.kind = 'source' AND p.name = w.source)
          -- Probes of the ordering index, one per event (written as EXISTS,
          -- the planner may hash a hot key's events against each other).
          AND w.id <> ALL (ARRAY(
              SELECT p.id FROM inbox_events p
              WHERE p.source = w.source AND p.ordering_key = w.ordering_key
                AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
              ORDER BY p.ordered_at, p.ordering_seq
              LIMIT 2))
        ORDER BY w.next_attempt_at, w.id
        LIMIT 10000
        FOR NO KEY UPDATE SKIP LOCKED));
$$;

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
    payload bytea, payload_json jsonb, attempt_id bigint, handler text, stale boolean
) LANGUAGE plpgsql
-- A claim is a short statement whose estimated cost can still pass
-- jit_above_cost (a hot key's queue): compiling it would cost more than
-- running it, at every call.
SET jit = off
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
        FROM inbox_events e
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
                      SELECT p.id FROM inbox_events p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key
                        AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
                      ORDER BY p.ordered_at, p.ordering_seq
                      LIMIT 1)
                  AND NOT EXISTS (
                      SELECT 1 FROM inbox_events p
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
                   (SELECT count(*) FROM inbox_attempts a
                     WHERE a.finished_at IS NULL AND a.handler = l.handler) AS in_flight,
                   (s.circuit = 'open' AND s.open_until <= clock_timestamp())
                   OR (s.circuit = 'half_open' AND NOT EXISTS (
                          SELECT 1 FROM inbox_events e
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
                   SELECT 1 FROM inbox_events f
                   WHERE f.source = e.source AND f.ordering_key = e.ordering_key
                     AND f.status IN ('succeeded', 'skipped') AND f.ordered_at > e.ordered_at), false) AS stale
        FROM candidate c JOIN inbox_events e ON e.id = c.id
        WHERE e.status IN ('pending', 'retrying')
          AND (e.ordering_key IS NULL OR (
                  EXISTS (SELECT 1 FROM unnest(locked_sources, locked_keys) AS k(source, ordering_key)
                          WHERE k.source = e.source AND k.ordering_key = e.ordering_key)
                  AND e.id = (
                      SELECT p.id FROM inbox_events p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key
                        AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
                      ORDER BY p.ordered_at, p.ordering_seq
                      LIMIT 1)
                  AND NOT EXISTS (
                      SELECT 1 FROM inbox_events p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key AND p.status = 'processing')))
    ), admitted AS (
        SELECT c.id, c.handler, c.stale
        FROM (SELECT c.*, row_number() OVER (PARTITION BY c.handler ORDER BY c.position) AS n
              FROM checked c) c
        WHERE c.handler IS NULL OR NOT (allowance ? c.handler) OR c.n <= (allowance ->> c.handler)::int
    ), claimed AS (
        UPDATE inbox_events e
        SET status = 'processing', attempts = e.attempts + 1, locked_by = p_worker,
            locked_until = now() + make_interval(secs => p_lease_secs)
        FROM admitted WHERE e.id = admitted.id
        RETURNING e.id, e.source, e.event_key, e.event_type, e.attempts, e.payload, e.payload_json,
                  admitted.handler, admitted.stale
    ), attempt AS (
        INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler)
        SELECT c.id, c.attempts, p_worker, c.handler FROM claimed c
        RETURNING inbox_attempts.id, inbox_attempts.event_id
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
    SELECT c.id, c.source, c.event_key, c.event_type, c.attempts, c.payload, c.payload_json,
           a.id, c.handler, c.stale
    FROM claimed c JOIN attempt a ON a.event_id = c.id;

    -- Fewer candidates than asked for: the scan of step 1 went through every
    -- due event, including those waiting behind another event of their key,
    -- and the next claim would again. Set them aside; last, so that this
    -- claim waits for nothing while it holds their row locks.
    IF cardinality(candidate_ids) < p_limit THEN
        PERFORM inbox_park_waiting(p_sources);
    END IF;
END;
$$;

-- Makes the first two unfinished events of each given key due now, if they
-- were set aside: called by whatever frees a key (a completion, `hookbox
-- skip`) in its own transaction, after its change.
CREATE FUNCTION inbox_wake_next(p_sources text[], p_keys text[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE inbox_events n SET next_attempt_at = clock_timestamp()
    WHERE n.id = ANY(ARRAY(
            SELECT first.id
            FROM (SELECT DISTINCT k.source, k.ordering_key
                  FROM unnest(p_sources, p_keys) AS k(source, ordering_key)) k,
            LATERAL (SELECT o.id FROM inbox_events o
                     WHERE o.source = k.source AND o.ordering_key = k.ordering_key
                       AND (o.status IN ('pending', 'processing', 'retrying') OR (o.status = 'dead' AND o.dead_blocks))
                     ORDER BY o.ordered_at, o.ordering_seq
                     LIMIT 2) first))
      AND n.status = 'pending' AND n.next_attempt_at > clock_timestamp();
$$;
