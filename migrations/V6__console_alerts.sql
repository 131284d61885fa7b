-- hookbox schema, version 6: alerts, and the indexes the web console pages on.

-- One row per configured alert. Whoever moves `next_evaluation_at` forward with
-- one atomic UPDATE evaluates the alert this round: exactly one worker at a
-- time, whatever the number of workers, with no lock held between rounds.
CREATE TABLE hookbox_alert_state (
    alert              text        PRIMARY KEY,
    next_evaluation_at timestamptz NOT NULL DEFAULT now(),
    evaluated_by       text,
    evaluated_at       timestamptz,
    -- The last notification that reached its endpoint: `every` counts from here.
    last_sent_at       timestamptz
);

-- Every notification attempt, sent or failed, for the console and for audit.
CREATE TABLE hookbox_alert_notifications (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    alert       text        NOT NULL,
    condition   text        NOT NULL,
    source      text,
    counts      jsonb       NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('sent', 'failed')),
    status_code integer,
    error       text,
    sent_by     text        NOT NULL
);
CREATE INDEX hookbox_alert_notifications_at_idx ON hookbox_alert_notifications (at);

-- The console's events page: newest first within a status, paged by id (ids
-- are time-ordered), so each page reads only its own rows. Payload search has
-- no index of its own: a GIN index would slow every insert on the receiver's
-- hot path, and searches are bounded by the page size and a statement timeout.
-- `source` rides along so the overview counts the open statuses per source
-- from the index alone.
-- inbox_events_status_id_idx (status, id) INCLUDE (source) comes with V5.
