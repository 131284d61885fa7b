-- hookbox schema, version 1: the four tables of the SQL contract.

CREATE TABLE inbox_events (
    id              uuid PRIMARY KEY,              -- UUIDv7: time-ordered
    source          text        NOT NULL,
    environment     text        NOT NULL,
    event_key       text        NOT NULL,
    event_type      text,
    status          text        NOT NULL DEFAULT 'pending'
        CONSTRAINT inbox_events_status_check
        CHECK (status IN ('pending', 'processing', 'retrying', 'succeeded', 'dead', 'skipped')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    received_at     timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_by       text,
    locked_until    timestamptz,
    processed_at    timestamptz,
    last_error      text,
    payload         bytea,                          -- exact bytes received; NULL once pruned
    payload_json    jsonb,                          -- when the payload is JSON
    headers         jsonb,                          -- request headers, credentials removed
    payload_sha256  text        NOT NULL,           -- lowercase hex; kept after pruning
    CONSTRAINT inbox_events_source_event_key_key UNIQUE (source, event_key),
    CONSTRAINT inbox_events_lease_check
        CHECK ((status = 'processing') = (locked_until IS NOT NULL))
);

-- What a claiming worker scans: due events only, oldest due first.
CREATE INDEX inbox_events_due_idx ON inbox_events (next_attempt_at)
    WHERE status IN ('pending', 'retrying');
-- What lease rescue scans.
CREATE INDEX inbox_events_lease_idx ON inbox_events (locked_until)
    WHERE status = 'processing';
-- Operator filters (status, listing by time per source).
CREATE INDEX inbox_events_source_received_idx ON inbox_events (source, received_at);
CREATE INDEX inbox_events_status_idx ON inbox_events (status);

CREATE TABLE inbox_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    source          text        NOT NULL,
    remote_addr     inet,
    outcome         text        NOT NULL
        CONSTRAINT inbox_deliveries_outcome_check
        CHECK (outcome IN ('accepted', 'duplicate', 'conflict', 'rejected_signature',
                           'rejected_ip', 'rejected_payload', 'too_large', 'imported')),
    reason          text,
    event_id        uuid REFERENCES inbox_events (id) ON DELETE SET NULL,
    payload_sha256  text,
    status_code     integer     NOT NULL
);
CREATE INDEX inbox_deliveries_event_idx ON inbox_deliveries (event_id);
CREATE INDEX inbox_deliveries_received_idx ON inbox_deliveries (received_at);

CREATE TABLE inbox_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL REFERENCES inbox_events (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    worker_id       text        NOT NULL,
    handler         text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    outcome         text
        CONSTRAINT inbox_attempts_outcome_check
        CHECK (outcome IN ('succeeded', 'retry', 'dead', 'lease_expired', 'skipped')),
    error           text
);
CREATE INDEX inbox_attempts_event_idx ON inbox_attempts (event_id, attempt);
CREATE INDEX inbox_attempts_started_idx ON inbox_attempts (started_at);

CREATE TABLE inbox_actions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    actor           text        NOT NULL,
    action          text        NOT NULL,
    filter          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    affected        bigint      NOT NULL DEFAULT 0,
    reason          text
);

-- Wake workers when events become due. One notification per statement, and
-- PostgreSQL folds identical notifications of one transaction into one.
-- Duplicates (ON CONFLICT DO NOTHING) insert no row and wake nobody.
CREATE FUNCTION inbox_notify_new_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows) THEN
        PERFORM pg_notify('hookbox_events', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER inbox_events_notify
    AFTER INSERT ON inbox_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION inbox_notify_new_events();
