-- wrk script: sends prepared, signed Begini events (bench/signed_events.py),
-- each once, in the order they were made, dealt over wrk's threads.
--   wrk -t2 -c64 -d20s -s bench/ingest.lua URL -- EVENTS_FILE THREADS
-- Prints the rate in `hookbox loadtest`'s format.
local all_threads = {}

function setup(thread)
    thread:set("id", #all_threads)
    all_threads[#all_threads + 1] = thread
end

function init(args)
    local file, threads = args[1], tonumber(args[2])
    requests, sent, wrapped = {}, 0, 0
    local i = 0
    for line in io.lines(file) do
        if i % threads == id then
            local tab = line:find("\t", 1, true)
            requests[#requests + 1] = wrk.format("POST", nil, {
                ["Content-Type"] = "application/json",
                ["X-Signature"] = line:sub(1, tab - 1),
            }, line:sub(tab + 1))
        end
        i = i + 1
    end
end

function request()
    sent = sent + 1
    if sent > #requests then
        -- Out of new events: the rest would be duplicates, a cheaper path.
        wrapped = wrapped + 1
        sent = 1
    end
    return requests[sent]
end

function done(summary, _, _)
    local seconds = summary.duration / 1e6
    print(string.format("%d requests in %.1fs: %.0f/s", summary.requests, seconds, summary.requests / seconds))
    local errors = summary.errors
    print(string.format("errors: connect %d, read %d, write %d, timeout %d, status (not 2xx) %d",
        errors.connect, errors.read, errors.write, errors.timeout, errors.status))
    local wrapped = 0
    for _, thread in ipairs(all_threads) do wrapped = wrapped + thread:get("wrapped") end
    if wrapped > 0 then
        print("WARNING: ran out of prepared events " .. wrapped .. " times; the rest were duplicates")
    end
    -- No percentiles: in runs here wrk's latency samples averaged twice what
    -- 64 connections at the measured rate allow (Little's law), so only the
    -- rate is reported; hookbox loadtest measures latency.
    print(string.format("mean latency by Little's law (connections / rate): %.2f ms",
        1000 * tonumber(os.getenv("WRK_CONNECTIONS") or "64") / (summary.requests / seconds)))
end
