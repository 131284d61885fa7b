-- hookbox schema, version 4: flow control. Events that share an ordering key
-- run one at a time, in order; sources and handlers can be paused; handlers
-- have limits and circuits shared by every worker. Everything that must hold
-- across worker processes is decided here, in the database.
--
-- Locks: the ALTER TABLE adds nullable columns without defaults (no rewrite),
-- and the indexes are partial over columns every existing row has NULL in, so
-- the migration holds its locks for moments, not for the size of the table.

ALTER TABLE inbox_events
    ADD COLUMN ordering_key   text,          -- from the source's ordering_key; NULL = unordered
    ADD COLUMN ordered_at     timestamptz,   -- the sender's time (order_by), else the time received
    ADD COLUMN ordering_seq   bigint,        -- receipt order, the tie-breaker
    ADD COLUMN dead_blocks    boolean,       -- on_dead = "block" when the event was received
    ADD COLUMN skip_if_stale  boolean;       -- stale = "skip" when the event was received

CREATE SEQUENCE inbox_ordering_seq;

-- Unfinished events of a key, in order: what "is anything ahead of it?" reads.
CREATE INDEX inbox_events_ordering_open_idx
    ON inbox_events (source, ordering_key, ordered_at, ordering_seq)
    WHERE ordering_key IS NOT NULL
      AND (status IN ('pending', 'processing', 'retrying') OR (status = 'dead' AND dead_blocks));
-- Finished events of a key, latest first: what the stale check reads.
CREATE INDEX inbox_events_ordering_done_idx
    ON inbox_events (source, ordering_key, ordered_at DESC)
    WHERE ordering_key IS NOT NULL AND status IN ('succeeded', 'skipped');
-- The guarantee itself: never two events of one key in flight at once.
CREATE UNIQUE INDEX inbox_events_one_in_flight_per_key
    ON inbox_events (source, ordering_key)
    WHERE ordering_key IS NOT NULL AND status = 'processing';

-- Attempts in flight per handler (the handler is recorded at claim).
CREATE INDEX inbox_attempts_in_flight_idx ON inbox_attempts (handler)
    WHERE finished_at IS NULL;

-- An ordered event waiting for another, and the one it waits for: the first
-- unfinished event ahead of it (a dead one only if its key blocks on dead), or
-- the one of its key in flight.
CREATE VIEW inbox_blocked_events AS
    SELECT e.id, e.source, e.ordering_key, e.event_type, e.status, e.received_at,
           b.id AS blocked_by, b.status AS blocked_by_status, b.last_error AS blocked_by_error
    FROM inbox_events e
    CROSS JOIN LATERAL (
        SELECT p.id, p.status, p.last_error
        FROM inbox_events p
        WHERE p.source = e.source AND p.ordering_key = e.ordering_key AND p.id <> e.id
          AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
          AND (p.status = 'processing'
               OR (p.ordered_at, p.ordering_seq) < (e.ordered_at, e.ordering_seq))
        ORDER BY p.ordered_at, p.ordering_seq
        LIMIT 1
    ) b
    WHERE e.ordering_key IS NOT NULL AND e.status IN ('pending', 'retrying');

-- Paused sources and handlers: no worker starts new work for them.
CREATE TABLE inbox_pauses (
    kind      text        NOT NULL CHECK (kind IN ('source', 'handler')),
    name      text        NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL,
    reason    text        NOT NULL,
    PRIMARY KEY (kind, name)
);

-- Per handler, shared by every worker: the rate limit's bucket and the circuit.
CREATE TABLE inbox_handler_state (
    handler     text PRIMARY KEY,
    tokens      double precision,
    tokens_at   timestamptz,
    circuit     text NOT NULL DEFAULT 'closed' CHECK (circuit IN ('closed', 'open', 'half_open')),
    failures    integer NOT NULL DEFAULT 0,
    open_until  timestamptz,
    probe_event uuid
);

-- Every change of a circuit: opened, probe, closed.
CREATE TABLE inbox_circuit_events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    handler  text        NOT NULL,
    change   text        NOT NULL CHECK (change IN ('opened', 'probe', 'closed')),
    event_id uuid,
    reason   text
);
CREATE INDEX inbox_circuit_events_handler_idx ON inbox_circuit_events (handler, at);

-- One row per ordering key a claim has considered: claimers lock it (SKIP
-- LOCKED) before they decide, so two claims never decide about one key at
-- once. Keys without unfinished events are cleared by worker housekeeping.
CREATE TABLE inbox_ordering_locks (
    source       text NOT NULL,
    ordering_key text NOT NULL,
    PRIMARY KEY (source, ordering_key)
);

-- The claim, as one statement (`SELECT * FROM inbox_claim(...)`): the due
-- events this worker may start, claimed under a lease with their attempt rows.
--
-- An event is claimable when its source is one this worker knows and is not
-- paused; when the handler its route names is not paused, has room under its
-- max_in_flight and rate limit, and its circuit is closed (or due a probe);
-- and, for an ordered event, when no event of its key is in flight and none
-- ahead of it is unfinished (a dead one only blocks if its key blocks on dead).
--
-- In steps, each statement of a function taking a fresh snapshot:
--   1. candidates, as this snapshot sees them, locked (SKIP LOCKED);
--   2. the ordering keys of ordered candidates, locked (SKIP LOCKED: a key
--      another claim is deciding about is left to it);
--   3. the state rows of the limited handlers among the candidates, locked in
--      name order (waiting: their counts must include every committed claim);
--   4. with a snapshot taken after those locks: the ordering check again,
--      the handlers' allowances, and the claim itself.
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
    payload bytea, payload_json jsonb, attempt_id bigint, handler text, stale boolean
) LANGUAGE plpgsql AS $$
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
          AND (e.ordering_key IS NULL OR NOT EXISTS (
                  SELECT 1 FROM inbox_events p
                  WHERE p.source = e.source AND p.ordering_key = e.ordering_key AND p.id <> e.id
                    AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
                    AND (p.status = 'processing'
                         OR (p.ordered_at, p.ordering_seq) < (e.ordered_at, e.ordering_seq))))
        ORDER BY e.next_attempt_at, e.id
        LIMIT p_limit
        FOR UPDATE OF e SKIP LOCKED
    ) c;
    IF cardinality(candidate_ids) = 0 THEN
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
                  AND NOT EXISTS (
                      SELECT 1 FROM inbox_events p
                      WHERE p.source = e.source AND p.ordering_key = e.ordering_key AND p.id <> e.id
                        AND (p.status IN ('pending', 'processing', 'retrying') OR (p.status = 'dead' AND p.dead_blocks))
                        AND (p.status = 'processing'
                             OR (p.ordered_at, p.ordering_seq) < (e.ordered_at, e.ordering_seq)))))
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
END;
$$;

-- What an external handler's attempt does to its circuit, in the transaction
-- that records the attempt: a success closes it; `failures` retryable failures
-- in a row (or a failed probe) open it for `cool_down`, or for the downstream's
-- own `Retry-After` when it gave one.
CREATE FUNCTION inbox_circuit_record(
    p_handler        text,
    p_event          uuid,
    p_succeeded      boolean,
    p_failures       integer,
    p_cool_down_secs double precision,
    p_retry_after    double precision,   -- NULL: the downstream named no time
    p_reason         text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    state inbox_handler_state;
BEGIN
    INSERT INTO inbox_handler_state (handler) VALUES (p_handler) ON CONFLICT DO NOTHING;
    SELECT * INTO state FROM inbox_handler_state WHERE handler = p_handler FOR UPDATE;
    -- While the probe runs, the outcome of an attempt started before the
    -- circuit opened says nothing new: only the probe decides.
    IF state.circuit = 'half_open' AND state.probe_event IS DISTINCT FROM p_event THEN
        RETURN;
    END IF;
    IF p_succeeded THEN
        UPDATE inbox_handler_state
        SET failures = 0, circuit = 'closed', open_until = NULL, probe_event = NULL
        WHERE handler = p_handler;
        IF state.circuit <> 'closed' THEN
            INSERT INTO inbox_circuit_events (handler, change, event_id, reason)
            VALUES (p_handler, 'closed', p_event, 'an attempt succeeded');
        END IF;
    ELSIF p_retry_after IS NOT NULL OR state.circuit = 'half_open' OR state.failures + 1 >= p_failures THEN
        UPDATE inbox_handler_state
        SET failures = state.failures + 1, circuit = 'open', probe_event = NULL,
            open_until = clock_timestamp() + make_interval(secs => coalesce(p_retry_after, p_cool_down_secs))
        WHERE handler = p_handler;
        INSERT INTO inbox_circuit_events (handler, change, event_id, reason)
        VALUES (p_handler, 'opened', p_event, p_reason);
    ELSE
        UPDATE inbox_handler_state SET failures = state.failures + 1 WHERE handler = p_handler;
    END IF;
END;
$$;
