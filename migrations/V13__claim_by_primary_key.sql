-- The claim looks its candidates up by primary key, whatever the statistics
-- say. Its final statement re-checked each candidate's status with a
-- condition that matches inbox_events_due_idx's predicate; with a generic plan
-- made while statistics said nothing was pending (a quiet spell, then a
-- burst), the planner drove the join from that index, so each claim of 500
-- walked every pending event 500 times: 3.4 s per claim over 100,000 pending
-- events, until autovacuum analyzed the table. Only the function's body
-- changes; its signature and results stay the same.

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
                   (SELECT count(*) FROM inbox_attempts a
                     WHERE a.finished_at IS NULL AND a.handler = l.handler) AS in_flight,
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
            locked_until = now() + make_interval(secs => p_lease_secs)
        FROM admitted WHERE e.id = admitted.id
        RETURNING e.id, e.source, e.event_key, e.event_type, e.attempts, e.legacy_payload,
                  e.legacy_payload_json IS NOT NULL AS legacy_payload_json, admitted.handler, admitted.stale
    ), attempt AS (
        INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler)
        SELECT c.id, c.attempts, p_worker, c.handler FROM claimed c
        RETURNING inbox_attempts.id, inbox_attempts.event_id, inbox_attempts.started_at
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
           a.id, a.started_at, c.handler, c.stale
    FROM claimed c
    JOIN attempt a ON a.event_id = c.id
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
