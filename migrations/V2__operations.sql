-- hookbox schema, version 2: what operators read.

-- Which events an operator action touched (replay, import), so each event's
-- timeline shows the actions that changed it.
CREATE TABLE inbox_action_events (
    action_id bigint NOT NULL REFERENCES inbox_actions (id) ON DELETE CASCADE,
    event_id  uuid   NOT NULL REFERENCES inbox_events (id) ON DELETE CASCADE,
    PRIMARY KEY (event_id, action_id)
);
CREATE INDEX inbox_action_events_action_idx ON inbox_action_events (action_id);

-- One row per delivery, attempt or operator action of an event.
CREATE VIEW inbox_event_timeline AS
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

-- Per source: events by status, the oldest due event, the last delivery and
-- the last failure.
CREATE VIEW inbox_source_health AS
    WITH sources AS (
        SELECT DISTINCT source FROM inbox_events
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
        FROM inbox_events
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
              FROM inbox_attempts a JOIN inbox_events e ON e.id = a.event_id
             WHERE e.source = s.source AND a.outcome IN ('retry', 'dead', 'lease_expired')) AS last_failure_at
    FROM sources s
    LEFT JOIN counts c ON c.source = s.source;
