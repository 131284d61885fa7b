-- hookbox schema, version 16: a `sql` handler's statement runs for many
-- events of a batch in one call, not one round trip per event.
--
-- The worker completes a claimed batch in one transaction: it used to send
-- the handler's statement once per event and wait for each answer. Over
-- loopback, that exchange cost more than the statement (an INSERT): both
-- processes woke once per event. Here the statement runs once per event
-- inside the server, with the same parameters, typed as they are when the
-- worker sends them ($1 payload jsonb, $2 event type, $3 event id, $4
-- source, $5 event key, $6 attempt). An array the statement does not use
-- comes as NULL.
--
-- A call stops after the event during which its budget ran out, and
-- returns how many events it ran: the worker checks between calls whether
-- the rest may still start (time left on the lease, no SIGTERM), so a call
-- is never a longer step than that, however slow the statement.
--
-- Any error ends the call, and the worker rolls the whole batch back and
-- runs it again one event at a time, each in a savepoint, exactly as it did
-- when a handler failed: which event failed, and how, is decided there.
--
-- Locks: creates a function; no table is touched.

CREATE FUNCTION inbox_run_statement(
    p_statement  text,
    p_budget     double precision,  -- seconds; the first event runs whatever it takes
    p_payloads   text[],            -- JSON text, cast here: the exact bytes received
    p_types      text[],
    p_ids        uuid[],
    p_sources    text[],
    p_keys       text[],
    p_attempts   integer[]
) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_budget);
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_ids), 0) LOOP
        EXECUTE p_statement
            USING p_payloads[i]::jsonb, p_types[i], p_ids[i], p_sources[i], p_keys[i], p_attempts[i];
        IF clock_timestamp() >= deadline THEN
            RETURN i;
        END IF;
    END LOOP;
    RETURN coalesce(cardinality(p_ids), 0);
END;
$$;
