-- hookbox schema, version 12: the payload is stored once.
--
-- Until now each payload was written twice, as its exact bytes and as
-- `jsonb`: about half of the bytes an event took (BENCHMARKS.md, "Bytes per
-- stored event"). From now on inbox_payloads keeps the bytes and a flag,
-- payload_is_json, set when the receiver found them to be JSON that `jsonb`
-- can hold (UTF-8, no \u0000). inbox_events.payload_json is computed from
-- the bytes when it is read, so operators' SQL reads the same column as
-- before: the exact bytes and the queryable JSON, from one copy. A query
-- that filters many rows on payload_json now parses each row's bytes; the
-- worker never does (the claim returns the flag, the worker parses the
-- bytes it already has).
--
-- Rows stored before keep what they have (payload_json, or legacy_* in
-- inbox_event_state): nothing is rewritten, and both kinds read the same
-- through the view and the claim.
--
-- Locks: adding the column (with a constant default: no rewrite) takes
-- ACCESS EXCLUSIVE on inbox_payloads and its partitions for a moment; the
-- view, the INSERT trigger and the claim are replaced.

ALTER TABLE inbox_payloads ADD COLUMN payload_is_json boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN inbox_payloads.payload_is_json IS
    'the payload bytes are JSON (UTF-8) that jsonb can hold; inbox_events.payload_json parses them';
COMMENT ON COLUMN inbox_payloads.payload_json IS
    'JSON of a payload stored before schema version 12 (later: computed from the bytes, see payload_is_json)';

-- Column for column as version 10's; payload_json comes from the bytes.
CREATE OR REPLACE VIEW inbox_events AS
    SELECT s.id, s.source, s.environment, s.event_key, s.event_type, s.status, s.attempts,
           s.received_at, s.next_attempt_at, s.locked_by, s.locked_until, s.processed_at,
           s.last_error,
           coalesce(s.legacy_payload,
                    (SELECT p.payload FROM inbox_payloads p WHERE p.event_id = s.id)) AS payload,
           coalesce(s.legacy_payload_json,
                    (SELECT coalesce(p.payload_json,
                                     CASE WHEN p.payload_is_json THEN convert_from(p.payload, 'UTF8')::jsonb END)
                     FROM inbox_payloads p WHERE p.event_id = s.id)) AS payload_json,
           coalesce(s.legacy_headers,
                    (SELECT p.headers FROM inbox_payloads p WHERE p.event_id = s.id)) AS headers,
           s.payload_sha256, s.ordering_key, s.ordered_at, s.ordering_seq, s.dead_blocks,
           s.skip_if_stale
    FROM inbox_event_state s;

-- An INSERT into the view (scripts, fixtures): JSON that comes with its
-- bytes is not stored again; JSON without bytes is kept as it is.
CREATE OR REPLACE FUNCTION inbox_events_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, status, attempts,
                                   received_at, next_attempt_at, locked_by, locked_until, processed_at,
                                   last_error, payload_sha256, ordering_key, ordered_at, ordering_seq,
                                   dead_blocks, skip_if_stale)
    VALUES (NEW.id, NEW.source, NEW.environment, NEW.event_key, NEW.event_type, NEW.status, NEW.attempts,
            NEW.received_at, NEW.next_attempt_at, NEW.locked_by, NEW.locked_until, NEW.processed_at,
            NEW.last_error, NEW.payload_sha256, NEW.ordering_key, NEW.ordered_at, NEW.ordering_seq,
            NEW.dead_blocks, NEW.skip_if_stale);
    IF NEW.payload IS NOT NULL OR NEW.payload_json IS NOT NULL OR NEW.headers IS NOT NULL THEN
        INSERT INTO inbox_payloads (event_id, payload, payload_json, payload_is_json, headers)
        VALUES (NEW.id, NEW.payload,
                CASE WHEN NEW.payload IS NULL THEN NEW.payload_json END,
                NEW.payload IS NOT NULL AND NEW.payload_json IS NOT NULL,
                NEW.headers);
    END IF;
    RETURN NEW;
END;
$$;

-- The claim returns whether the payload is JSON (payload_is_json) instead of
-- the parsed JSON: it is dropped and made again, otherwise as version 11's
-- (migrations/V10__partitioned_history.sql, V11__cached_claim_plans.sql).
DROP FUNCTION inbox_claim(text, integer, double precision, text[], integer[], text[], text[],
                          text[], text[], integer[], double precision[], double precision[], boolean[]);

CREATE FUNCTION inbox_claim(
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
        WHERE e.status IN ('pending', 'retrying')
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
