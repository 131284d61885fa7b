-- hookbox schema, version 5: refusals counted per minute, and the indexes
-- that keep prune and replay linear on large tables.

-- Every refused delivery is counted here, per minute, source, outcome and
-- reason. Only the first few of each minute (receiver.refusals_detailed_per_minute)
-- also get an inbox_deliveries row, so a flood of forged requests costs a
-- counter update instead of a row each.
CREATE TABLE inbox_refusal_counts (
    minute      timestamptz NOT NULL,          -- start of the minute (UTC)
    source      text        NOT NULL,
    outcome     text        NOT NULL,          -- rejected_signature, rejected_ip, too_large, rate_limited, ...
    reason      text        NOT NULL,
    refused     bigint      NOT NULL DEFAULT 0, -- every refusal of that minute
    detailed    bigint      NOT NULL DEFAULT 0, -- how many of them have an inbox_deliveries row
    PRIMARY KEY (minute, source, outcome, reason)
);

-- prune: the events whose payload may still be dropped, in the order prune
-- pages through them. A pruned event leaves the index, so no batch reads past
-- the rows that earlier batches pruned.
CREATE INDEX inbox_events_prunable_idx ON inbox_events (processed_at, id)
    WHERE payload IS NOT NULL AND status IN ('succeeded', 'skipped', 'dead');

-- replay: one status at a time, in id order (keyset paging). Also serves every
-- filter by status (the console's event pages read source from it too), so
-- the index on status alone goes.
CREATE INDEX inbox_events_status_id_idx ON inbox_events (status, id) INCLUDE (source);
DROP INDEX inbox_events_status_idx;
