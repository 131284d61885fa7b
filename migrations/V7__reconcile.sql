-- hookbox schema, version 7: reconciliation with the provider.

-- One row per source that reconciles: when its next scheduled run is due, the
-- worker running it now, and how far the provider's listing has been checked.
-- Workers elect the one that runs a period with a single UPDATE of this row
-- (`next_run_at <= now()`), so at most one run starts per period, whatever the
-- number of workers.
CREATE TABLE inbox_reconcile_cursors (
    source          text PRIMARY KEY,
    -- Every event the provider created before this was listed by a finished
    -- run; the next run starts `lookback` before it.
    listed_through  timestamptz,
    next_run_at     timestamptz NOT NULL DEFAULT now(),
    -- Set while a run is under way; a crashed run's expires and frees the row.
    running_by      text,
    running_until   timestamptz,
    last_run_at     timestamptz,
    last_error      text
);
