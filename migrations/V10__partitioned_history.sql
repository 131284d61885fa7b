-- hookbox schema, version 10: history that retention can drop whole.
--
-- The append-only history is partitioned by time, so that `hookbox prune`
-- drops a partition (a moment, whatever its size) instead of deleting its
-- rows one by one:
--
--   inbox_deliveries  by received_at
--   inbox_attempts    by started_at
--   inbox_payloads    by event_id (event ids are UUIDv7: a range of ids is a
--                     range of receipt times), the payload bytes, JSON and
--                     headers of events received from now on
--
-- inbox_events keeps one row per event key for ever (late duplicates are
-- recognised by it); its state lives in the table inbox_event_state, and
-- inbox_events is a view over it with the same columns, in the same order,
-- as before. Its payload, payload_json and headers come from inbox_payloads
-- (or, for events received before this migration, from the columns they
-- always had, now named legacy_*). The view can be updated (except the
-- payload columns) and inserted into, like the table it replaces.
--
-- Nothing is copied: the existing tables become the first partition of the
-- new ones ("..._v9", everything before the boundary), the existing payloads
-- stay where they are. The migration holds ACCESS EXCLUSIVE locks on
-- inbox_events, inbox_deliveries and inbox_attempts until it commits, for as
-- long as two sequential scans (of inbox_deliveries and inbox_attempts) take
-- to prove the first partitions' bounds: see docs/runbook.md, "Upgrading to
-- schema version 10".
--
-- Workers make the partitions ahead of time ([worker] partition_interval,
-- partitions_ahead; inbox_make_partition below); a DEFAULT partition of each
-- table takes rows no partition was made for, so an insert never fails.
--
-- The functions of version 9 that read or write the event rows (inbox_claim,
-- inbox_park_waiting, inbox_wake_next) are made again over
-- inbox_event_state, at the end of this file.

-- The smallest UUIDv7 of a moment, and the moment of a UUIDv7 (milliseconds).
CREATE FUNCTION inbox_uuid_at(t timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(greatest(0, floor(extract(epoch FROM t) * 1000))::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

CREATE FUNCTION inbox_uuid_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_timestamp(('x' || lpad(left(replace(id::text, '-', ''), 12), 16, '0'))::bit(64)::bigint / 1000.0)
$$;

-- Every lock the migration needs, at once and in the order writers take
-- them, so that no receiver or worker can deadlock with it.
LOCK TABLE inbox_events, inbox_deliveries, inbox_attempts IN ACCESS EXCLUSIVE MODE;

-- Where the first partitions end: after every delivery and attempt already
-- stored, at a midnight (UTC), so that the partitions workers make later
-- continue on a regular grid; with none stored yet, today's midnight. Both
-- maxima are read from an index. (Payloads have no rows to place yet.)
CREATE TABLE pg_temp.boundary AS
    SELECT CASE WHEN newest IS NULL THEN date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                ELSE (date_trunc('day', newest AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC'
           END AS at
    FROM (SELECT greatest((SELECT max(received_at) FROM inbox_deliveries),
                          (SELECT max(started_at) FROM inbox_attempts)) AS newest) n;

------------------------------------------------------------------------------
-- Events: the state table, the payload table and the view.

ALTER TABLE inbox_events RENAME TO inbox_event_state;
ALTER TABLE inbox_event_state RENAME COLUMN payload TO legacy_payload;
ALTER TABLE inbox_event_state RENAME COLUMN payload_json TO legacy_payload_json;
ALTER TABLE inbox_event_state RENAME COLUMN headers TO legacy_headers;
COMMENT ON COLUMN inbox_event_state.legacy_payload IS
    'payload of an event received before schema version 10 (later events: inbox_payloads)';

CREATE TABLE inbox_payloads (
    event_id     uuid  NOT NULL REFERENCES inbox_event_state (id) ON DELETE CASCADE,
    payload      bytea,                 -- exact bytes received
    payload_json jsonb,                 -- when the payload is JSON
    headers      jsonb,                 -- request headers, credentials removed
    CONSTRAINT inbox_payloads_pkey PRIMARY KEY (event_id)
) PARTITION BY RANGE (event_id);

DO $$
DECLARE
    boundary timestamptz := (SELECT at FROM pg_temp.boundary);
BEGIN
    EXECUTE format('CREATE TABLE inbox_payloads_v9 PARTITION OF inbox_payloads FOR VALUES FROM (MINVALUE) TO (%L)',
                   inbox_uuid_at(boundary));
END;
$$;
CREATE TABLE inbox_payloads_default PARTITION OF inbox_payloads DEFAULT;

-- Column for column the table it replaces. A payload column reads the
-- legacy column first: only events received before version 10 have one, and
-- it spares them a look-up. Each payload column is a look-up of its own, so
-- a query that reads none of them reads inbox_event_state alone.
CREATE VIEW inbox_events AS
    SELECT s.id, s.source, s.environment, s.event_key, s.event_type, s.status, s.attempts,
           s.received_at, s.next_attempt_at, s.locked_by, s.locked_until, s.processed_at,
           s.last_error,
           coalesce(s.legacy_payload,
                    (SELECT p.payload FROM inbox_payloads p WHERE p.event_id = s.id)) AS payload,
           coalesce(s.legacy_payload_json,
                    (SELECT p.payload_json FROM inbox_payloads p WHERE p.event_id = s.id)) AS payload_json,
           coalesce(s.legacy_headers,
                    (SELECT p.headers FROM inbox_payloads p WHERE p.event_id = s.id)) AS headers,
           s.payload_sha256, s.ordering_key, s.ordered_at, s.ordering_seq, s.dead_blocks,
           s.skip_if_stale
    FROM inbox_event_state s;
ALTER VIEW inbox_events ALTER COLUMN status SET DEFAULT 'pending';
ALTER VIEW inbox_events ALTER COLUMN attempts SET DEFAULT 0;
ALTER VIEW inbox_events ALTER COLUMN received_at SET DEFAULT now();
ALTER VIEW inbox_events ALTER COLUMN next_attempt_at SET DEFAULT now();

-- UPDATE and DELETE on the view reach inbox_event_state by themselves; an
-- INSERT (scripts, fixtures) puts each part where it belongs.
CREATE FUNCTION inbox_events_insert() RETURNS trigger LANGUAGE plpgsql AS $$
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
        INSERT INTO inbox_payloads (event_id, payload, payload_json, headers)
        VALUES (NEW.id, NEW.payload, NEW.payload_json, NEW.headers);
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER inbox_events_insert INSTEAD OF INSERT ON inbox_events
    FOR EACH ROW EXECUTE FUNCTION inbox_events_insert();

------------------------------------------------------------------------------
-- Deliveries: the table becomes the first partition of a partitioned one.
-- Partitioned tables cannot have identity columns (PostgreSQL 15), and a
-- primary key must include the partition key: ids come from a sequence that
-- continues after the last id, and each partition has its own primary key on
-- id (the first keeps the one it has: no index is built).

ALTER TABLE inbox_deliveries RENAME TO inbox_deliveries_v9;
ALTER TABLE inbox_deliveries_v9 RENAME CONSTRAINT inbox_deliveries_pkey TO inbox_deliveries_v9_pkey;
ALTER INDEX inbox_deliveries_event_idx RENAME TO inbox_deliveries_v9_event_idx;
ALTER INDEX inbox_deliveries_received_idx RENAME TO inbox_deliveries_v9_received_idx;
ALTER TABLE inbox_deliveries_v9 ALTER COLUMN id DROP IDENTITY;

CREATE SEQUENCE inbox_deliveries_id_seq;
SELECT setval('inbox_deliveries_id_seq', coalesce(max(id), 0) + 1, false) FROM inbox_deliveries_v9;

CREATE TABLE inbox_deliveries (
    id              bigint      NOT NULL DEFAULT nextval('inbox_deliveries_id_seq'),
    received_at     timestamptz NOT NULL DEFAULT now(),
    source          text        NOT NULL,
    remote_addr     inet,
    outcome         text        NOT NULL
        CONSTRAINT inbox_deliveries_outcome_check
        CHECK (outcome IN ('accepted', 'duplicate', 'conflict', 'rejected_signature',
                           'rejected_ip', 'rejected_payload', 'too_large', 'imported')),
    reason          text,
    event_id        uuid
        CONSTRAINT inbox_deliveries_event_id_fkey
        REFERENCES inbox_event_state (id) ON DELETE SET NULL,
    payload_sha256  text,
    status_code     integer     NOT NULL
) PARTITION BY RANGE (received_at);
ALTER SEQUENCE inbox_deliveries_id_seq OWNED BY inbox_deliveries.id;
CREATE INDEX inbox_deliveries_event_idx ON inbox_deliveries (event_id);
CREATE INDEX inbox_deliveries_received_idx ON inbox_deliveries (received_at);

-- The CHECK proves the bound, so ATTACH does not scan again; the existing
-- indexes and the foreign key are adopted as they are.
DO $$
DECLARE
    boundary timestamptz := (SELECT at FROM pg_temp.boundary);
BEGIN
    EXECUTE format('ALTER TABLE inbox_deliveries_v9 ADD CONSTRAINT inbox_deliveries_v9_bound CHECK (received_at < %L)',
                   boundary);
    EXECUTE format('ALTER TABLE inbox_deliveries ATTACH PARTITION inbox_deliveries_v9 FOR VALUES FROM (MINVALUE) TO (%L)',
                   boundary);
END;
$$;
ALTER TABLE inbox_deliveries_v9 DROP CONSTRAINT inbox_deliveries_v9_bound;
CREATE TABLE inbox_deliveries_default PARTITION OF inbox_deliveries DEFAULT;
ALTER TABLE inbox_deliveries_default ADD PRIMARY KEY (id);

------------------------------------------------------------------------------
-- Attempts: the same, on started_at.

ALTER TABLE inbox_attempts RENAME TO inbox_attempts_v9;
ALTER TABLE inbox_attempts_v9 RENAME CONSTRAINT inbox_attempts_pkey TO inbox_attempts_v9_pkey;
ALTER INDEX inbox_attempts_event_idx RENAME TO inbox_attempts_v9_event_idx;
ALTER INDEX inbox_attempts_started_idx RENAME TO inbox_attempts_v9_started_idx;
ALTER INDEX inbox_attempts_in_flight_idx RENAME TO inbox_attempts_v9_in_flight_idx;
ALTER TABLE inbox_attempts_v9 ALTER COLUMN id DROP IDENTITY;

CREATE SEQUENCE inbox_attempts_id_seq;
SELECT setval('inbox_attempts_id_seq', coalesce(max(id), 0) + 1, false) FROM inbox_attempts_v9;

CREATE TABLE inbox_attempts (
    id              bigint      NOT NULL DEFAULT nextval('inbox_attempts_id_seq'),
    event_id        uuid        NOT NULL
        CONSTRAINT inbox_attempts_event_id_fkey
        REFERENCES inbox_event_state (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    worker_id       text        NOT NULL,
    handler         text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    outcome         text
        CONSTRAINT inbox_attempts_outcome_check
        CHECK (outcome IN ('succeeded', 'retry', 'dead', 'lease_expired', 'skipped')),
    error           text
) PARTITION BY RANGE (started_at);
ALTER SEQUENCE inbox_attempts_id_seq OWNED BY inbox_attempts.id;
CREATE INDEX inbox_attempts_event_idx ON inbox_attempts (event_id, attempt);
CREATE INDEX inbox_attempts_started_idx ON inbox_attempts (started_at);
CREATE INDEX inbox_attempts_in_flight_idx ON inbox_attempts (handler) WHERE finished_at IS NULL;

DO $$
DECLARE
    boundary timestamptz := (SELECT at FROM pg_temp.boundary);
BEGIN
    EXECUTE format('ALTER TABLE inbox_attempts_v9 ADD CONSTRAINT inbox_attempts_v9_bound CHECK (started_at < %L)',
                   boundary);
    EXECUTE format('ALTER TABLE inbox_attempts ATTACH PARTITION inbox_attempts_v9 FOR VALUES FROM (MINVALUE) TO (%L)',
                   boundary);
END;
$$;
ALTER TABLE inbox_attempts_v9 DROP CONSTRAINT inbox_attempts_v9_bound;
CREATE TABLE inbox_attempts_default PARTITION OF inbox_attempts DEFAULT;
ALTER TABLE inbox_attempts_default ADD PRIMARY KEY (id);

------------------------------------------------------------------------------
-- The views that read deliveries and attempts follow the renamed tables (a
-- view refers to a table, not to its name): point them at the new ones.
-- inbox_blocked_events reads inbox_event_state, as it should.

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
    SELECT link.event_id,
           action.at,
           'action',
           action.action,
           concat_ws(' ', 'by ' || action.actor, 'reason: ' || action.reason)
    FROM inbox_action_events link
    JOIN inbox_actions action ON action.id = link.action_id;

CREATE OR REPLACE VIEW inbox_source_health AS
    WITH sources AS (
        SELECT DISTINCT source FROM inbox_event_state
        UNION
        SELECT DISTINCT source FROM inbox_deliveries
    ), counts AS (
        SELECT source,
               count(*) FILTER (WHERE status = 'pending')    AS pending,
               count(*) FILTER (WHERE status = 'processing') AS processing,
               count(*) FILTER (WHERE status = 'retrying')   AS retrying,
               count(*) FILTER (WHERE status = 'succeeded')  AS succeeded,
               count(*) FILTER (WHERE status = 'dead')       AS dead,
               count(*) FILTER (WHERE status = 'skipped')    AS skipped,
               min(next_attempt_at) FILTER (WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now())
                   AS oldest_due_at
        FROM inbox_event_state
        GROUP BY source
    )
    SELECT s.source,
           coalesce(c.pending, 0)    AS pending,
           coalesce(c.processing, 0) AS processing,
           coalesce(c.retrying, 0)   AS retrying,
           coalesce(c.succeeded, 0)  AS succeeded,
           coalesce(c.dead, 0)       AS dead,
           coalesce(c.skipped, 0)    AS skipped,
           c.oldest_due_at,
           now() - c.oldest_due_at   AS oldest_due_age,
           (SELECT max(d.received_at) FROM inbox_deliveries d WHERE d.source = s.source) AS last_delivery_at,
           (SELECT max(a.finished_at)
              FROM inbox_attempts a JOIN inbox_event_state e ON e.id = a.event_id
             WHERE e.source = s.source AND a.outcome IN ('retry', 'dead', 'lease_expired')) AS last_failure_at
    FROM sources s
    LEFT JOIN counts c ON c.source = s.source;

------------------------------------------------------------------------------
-- Partitions, for operators and for the code that makes and drops them:
-- each partition of the three tables, the times its range covers (a
-- payload partition's range of ids as receipt times; NULL: unbounded) and
-- whether it is the DEFAULT partition.

CREATE VIEW inbox_partitions AS
    WITH bound AS (
        SELECT parent.relname::text AS parent, child.relname::text AS partition,
               pg_get_expr(child.relpartbound, child.oid) AS bound
        FROM pg_inherits i
        JOIN pg_class parent ON parent.oid = i.inhparent
        JOIN pg_class child ON child.oid = i.inhrelid
        WHERE i.inhparent IN (to_regclass('inbox_deliveries'), to_regclass('inbox_attempts'),
                              to_regclass('inbox_payloads'))
    ), value AS (
        SELECT parent, partition, bound = 'DEFAULT' AS is_default,
               (regexp_match(bound, $re$FROM \('([^']*)'\)$re$))[1] AS lower,
               (regexp_match(bound, $re$TO \('([^']*)'\)$re$))[1] AS upper
        FROM bound
    )
    SELECT parent, partition, is_default,
           CASE WHEN parent = 'inbox_payloads' THEN inbox_uuid_time(lower::uuid) ELSE lower::timestamptz END AS from_time,
           CASE WHEN parent = 'inbox_payloads' THEN inbox_uuid_time(upper::uuid) ELSE upper::timestamptz END AS to_time
    FROM value;

-- Makes the next partition `p_parent` needs (inbox_deliveries,
-- inbox_attempts or inbox_payloads), and returns its name; NULL when its
-- partitions already reach `p_ahead` intervals past now. Call it until it
-- returns NULL. Partitions follow the last one without gaps, on its grid,
-- except that none is made for times already past. A range some rows of the
-- DEFAULT partition fall in is left to the DEFAULT partition: rows are never
-- moved. Makers queue on an advisory lock, so two never race.
--
-- Locks: the new table is created on its own and then attached, which takes
-- SHARE UPDATE EXCLUSIVE on the parent (reads and writes go on) and ACCESS
-- EXCLUSIVE on the DEFAULT partition while it is checked for rows of the new
-- range (a moment while it is empty, as it is while partitions are made ahead).
CREATE FUNCTION inbox_make_partition(p_parent text, p_interval_secs double precision, p_ahead integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    step    interval := make_interval(secs => p_interval_secs);
    horizon timestamptz := now() + p_ahead * make_interval(secs => p_interval_secs);
    key     text;
    lo      timestamptz;
    hi      timestamptz;
    lo_v    text;
    hi_v    text;
    name    text;
    taken   boolean;
BEGIN
    IF p_parent NOT IN ('inbox_deliveries', 'inbox_attempts', 'inbox_payloads') THEN
        RAISE EXCEPTION 'inbox_make_partition: % is not a partitioned history table', p_parent;
    END IF;
    IF p_interval_secs IS NULL OR p_interval_secs < 60 THEN
        RAISE EXCEPTION 'inbox_make_partition: the interval must be at least a minute';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('inbox_make_partition'));
    key := CASE p_parent WHEN 'inbox_deliveries' THEN 'received_at'
                         WHEN 'inbox_attempts' THEN 'started_at' ELSE 'event_id' END;
    SELECT max(to_time) INTO lo FROM inbox_partitions WHERE parent = p_parent AND NOT is_default;
    lo := coalesce(lo, date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
    IF lo + step <= now() THEN
        -- Nothing is received in the past: start with the interval of now.
        lo := lo + floor(extract(epoch FROM now() - lo) / p_interval_secs) * step;
    END IF;
    WHILE lo < horizon LOOP
        hi := lo + step;
        IF key = 'event_id' THEN
            lo_v := inbox_uuid_at(lo)::text;
            hi_v := inbox_uuid_at(hi)::text;
        ELSE
            lo_v := to_char(lo AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
            hi_v := to_char(hi AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= %L AND %I < %L)',
                       p_parent || '_default', key, lo_v, key, hi_v)
            INTO taken;
        IF NOT taken THEN
            name := p_parent || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24MISS');
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)',
                           name, p_parent);
            IF key <> 'event_id' THEN
                EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (id)', name);
            END IF;
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           p_parent, name, lo_v, hi_v);
            RETURN name;
        END IF;
        lo := hi;
    END LOOP;
    RETURN NULL;
END;
$$;

-- Every partition the three tables need now, in one transaction; returns
-- their names. For operators; workers call inbox_make_partition one
-- partition at a time.
CREATE FUNCTION inbox_make_partitions(p_interval_secs double precision, p_ahead integer)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    made   text;
BEGIN
    FOREACH parent IN ARRAY ARRAY['inbox_deliveries', 'inbox_attempts', 'inbox_payloads'] LOOP
        LOOP
            made := inbox_make_partition(parent, p_interval_secs, p_ahead);
            EXIT WHEN made IS NULL;
            RETURN NEXT made;
        END LOOP;
    END LOOP;
END;
$$;

-- Tasks one worker at a time runs, on a schedule. Whoever moves
-- `next_run_at` forward with one atomic UPDATE runs the task this period:
-- exactly one worker, whatever the number of workers (as for alerts and
-- scheduled reconciliation).
CREATE TABLE inbox_housekeeping (
    task        text        PRIMARY KEY,
    next_run_at timestamptz NOT NULL DEFAULT now(),
    run_by      text,
    run_at      timestamptz,
    runs        bigint      NOT NULL DEFAULT 0,
    last_error  text
);
INSERT INTO inbox_housekeeping (task) VALUES ('partitions');

------------------------------------------------------------------------------
-- The claim and the functions of version 9 (ordered events set aside while
-- they wait, and woken when their key is freed), over inbox_event_state:
-- under the view, an UPDATE would reach the state table through the view's
-- rewrite and a probe would plan against the view. Everything else is
-- version 9's, statement for statement: the claim without JIT, the two index
-- probes per ordered candidate (the first unfinished event of its key, in key
-- order, LIMIT 1; nothing of its key in flight), the park at the early return
-- and after a claim that came back short, FOR UPDATE of the candidates and
-- NO KEY UPDATE SKIP LOCKED in the park. The claim's payload comes from
-- inbox_payloads (or the legacy columns), and the attempt's started_at comes
-- back with its id, so that finishing it reads one partition of
-- inbox_attempts, not all of them.

-- As version 9's: see migrations/V9__ordered_waiting.sql.
CREATE OR REPLACE FUNCTION inbox_park_waiting(p_sources text[]) RETURNS void
LANGUAGE sql AS $$
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
$$;

-- As version 9's: see migrations/V9__ordered_waiting.sql.
CREATE OR REPLACE FUNCTION inbox_wake_next(p_sources text[], p_keys text[]) RETURNS void
LANGUAGE sql AS $$
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
$$;

-- The claim returns one more column (attempt_started_at): it is dropped and
-- made again.
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
    payload bytea, payload_json jsonb, attempt_id bigint, attempt_started_at timestamptz,
    handler text, stale boolean
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
                  e.legacy_payload_json, admitted.handler, admitted.stale
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
           coalesce(c.legacy_payload, p.payload), coalesce(c.legacy_payload_json, p.payload_json),
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

DROP TABLE pg_temp.boundary;
