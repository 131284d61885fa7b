#!/usr/bin/env bash
# One run of hookbox's benchmarks on this machine, against a private PostgreSQL
# cluster (fsync on): prints the figures for BENCHMARKS.md.
#   bash bench/run.sh [SECONDS]      (each timed phase runs SECONDS, default 30)
# (a) the ceiling: pgbench doing what a naive receiver does per event, 16 and 64 clients,
#     and the batched limit: 32 events per transaction, 4 clients
# (b) receiver ingest, 64 connections: wrk sending events signed before the clock on
#     60 and hookbox loadtest probing latency on 4, in open loop at PROBE_RATE (200/s);
#     INGEST_CLIENT=loadtest (or no wrk installed): hookbox loadtest on all 64.
#     With (a), the batched limit is measured again after ingest, and the ratio is
#     printed against the run before and against the mean of both. With wrk, also
#     the machine's time per accepted event: PostgreSQL, the receiver, the rest, idle.
# (c) worker drain of 200,000 stored events through a sql handler inserting a row each
# (w) the same drain by graphile-worker 0.17.3 in its batched mode (bench/graphile,
#     needs node and npm; not in the default phases); with (c), the ratio
# (d) end-to-end latency, 200 -> handler start, at 1,000 events/s offered
# (e) peak RSS of the receiver and the worker
# (o) the same drain as (c) with per-key ordering on, 10,000 keys; its ratio to (c)
# (k) one hot key: 5,000 ordered events of one key, commit -> next start per event
# PROFILE=1 also samples the whole machine with perf during (b), (c) and (d) and
# (KEEP_PROFILE=/path/prefix keeps each perf.data as prefix.phase.perf)
# prints each process's share of the CPU and the hottest symbols.
# (s) storage: ingest, drain, then bytes per stored event against the payload
# (m) 1, 2 and 4 receivers (ingest), then 1, 2 and 4 workers (drain), one PostgreSQL
# (g) ingest and drain on an empty database, then with STORED (10,000,000)
#     finished events stored, in one run (not in the default phases: ~20 min)
# PHASES=d (any of a, b, c, w, d, o, k, s, m, g; default abdcoks) runs only those phases.
# SETUP_SQL runs after the migrations (an A/B of a schema change);
# RECEIVER_TOML adds lines to the receiver's section (http_workers = 2).
# WORKER_CONCURRENCY (16) and WORKER_TOML (batch_size = 1000) do the same for the worker.
# PG_SERVER_OPTIONS adds server settings ("-c auto_explain..."); KEEP_PG_LOG=file
# keeps the server's log.
# pg_stat_statements is loaded (statements inside functions counted too), so
# (c), (d), (o) and (k) print what each statement costs; with PROFILE=1, its
# planning too.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
phases=${PHASES:-abdcoks}
events=${EVENTS:-200000}    # (c)'s backlog
# BIN_DIR=path runs binaries built elsewhere (another commit, for an A/B).
if [ -n "${BIN_DIR:-}" ]; then
    bin=$BIN_DIR
else
    cargo build --release --bins --quiet
    bin=$PWD/target/release
fi

# The real directory (a PATH entry may be a symlink), where pgbench lives too.
pg_bin=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")")
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
work=$(mktemp -d /tmp/hookbox-bench-XXXXXX)
chmod 755 "$work"
pgdata=$work/pg
mkdir "$pgdata"
[ "$(id -u)" = 0 ] && chown postgres: "$pgdata"
# A port free on loopback now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
workers=(); receivers=()
cleanup() {
    kill "${receiver:-}" "${worker:-}" "${workers[@]}" "${receivers[@]}" 2>/dev/null || true
    as_pg "$pg_bin/pg_ctl" stop -m fast -D "$pgdata" >/dev/null 2>&1 || true
    [ -z "${KEEP_PG_LOG:-}" ] || cp "$pgdata/log" "$KEEP_PG_LOG" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# Statements inside functions are counted too; PROFILE=1 also counts planning.
track_planning=""; [ -n "${PROFILE:-}" ] && track_planning="-c pg_stat_statements.track_planning=on"
as_pg "$pg_bin/initdb" -U postgres --auth=trust -E UTF8 --locale=C -D "$pgdata" >/dev/null
as_pg "$pg_bin/pg_ctl" start -w -D "$pgdata" -l "$pgdata/log" \
    -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300 -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all $track_planning ${PG_SERVER_OPTIONS:-}" >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
export BEGINI_API_KEY=bench-key-for-the-benchmark RUST_LOG=warn PGOPTIONS="-c client_min_messages=warning"
psql() { command psql -q -X -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }

rport=$(free_port)
aport=$(free_port)
cat > "$work/hookbox.toml" <<TOML
[database]
max_connections = 32
[receiver]
listen = "127.0.0.1:$rport"
admin_listen = "127.0.0.1:$aport"
${RECEIVER_TOML:-}
[worker]
admin_listen = ""
concurrency = ${WORKER_CONCURRENCY:-16}
${WORKER_TOML:-}
[[source]]
name = "begini"
environment = "sandbox"
scheme = "begini"
secrets_env = ["BEGINI_API_KEY"]
event_key = { json = ["/integration_id", "/uid", "/event/type"] }
[[route]]
source = "begini"
handler = "h"
[handler.h]
kind = "sql"
statement = "INSERT INTO side_effects (event_id) VALUES (\$3)"
TOML
export HOOKBOX_CONFIG=$work/hookbox.toml
"$bin/hookbox" migrate >/dev/null
# SETUP_SQL="..." runs after the migrations: an A/B of a schema change before
# it becomes a migration.
[ -z "${SETUP_SQL:-}" ] || psql -q -v ON_ERROR_STOP=1 -c "$SETUP_SQL" >/dev/null
psql -c "CREATE EXTENSION pg_stat_statements"
# Waiting for a drain to end: one session asking every 0.2 s, as
# bench/graphile/drain.js does for graphile-worker (a psql process started
# five times a second took 9% of the machine from the drain it timed). Each
# question in a transaction of its own, so the wait holds back no vacuum.
psql -c "CREATE PROCEDURE bench_wait_drained() LANGUAGE plpgsql AS \$\$
BEGIN
    WHILE EXISTS (SELECT 1 FROM inbox_events WHERE status IN ('pending', 'processing', 'retrying')) LOOP
        COMMIT;
        PERFORM pg_sleep(0.2);
        COMMIT;
    END LOOP;
END \$\$"
wait_drained() { psql -c "CALL bench_wait_drained()"; }
psql -c "CREATE TABLE side_effects (event_id uuid NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
# Each phase starts from empty tables and a checkpoint, so one phase's writes
# are not flushed during the next.
reset() { psql -c "TRUNCATE inbox_event_state, inbox_payloads, inbox_deliveries, inbox_attempts, side_effects CASCADE" -c "CHECKPOINT"; }
# A time-ordered id of now, as the receiver makes them (UUIDv7-like).
v7="(left(inbox_uuid_at(clock_timestamp())::text, 14) || right(gen_random_uuid()::text, 22))::uuid"
# profile NAME SECONDS: samples every process for SECONDS in the background.
profile() {
    [ -n "${PROFILE:-}" ] || return 0
    (sleep 3; perf record -a -g -o "$work/$1.perf" -- sleep "$2" >/dev/null 2>&1) &
    profiler=$!
}
profile_report() {
    [ -n "${PROFILE:-}" ] || return 0
    wait "$profiler"
    echo "  profile ($1): CPU share by process"
    perf report -i "$work/$1.perf" --sort comm --stdio --no-children -g none 2>/dev/null | grep -E '^ +[0-9]' | awk 'NR <= 6 {print "    " $0}'
    echo "  profile ($1): hottest symbols"
    perf report -i "$work/$1.perf" --sort comm,sym --stdio --no-children -g none 2>/dev/null | grep -E '^ +[0-9]' | awk 'NR <= 12 {print "    " $0}'
    [ -z "${KEEP_PROFILE:-}" ] || cp "$work/$1.perf" "$KEEP_PROFILE.$1.perf"
}
# statement_costs PER: the costliest statements since the last reset, per PER
# (the events they served).
statement_costs() {
    psql -At -c "SELECT format('    %s us/event  %s us/call plan %s us/call  %s  %s', round((total_exec_time * 1000 / $1)::numeric, 1),
                               round((mean_exec_time * 1000)::numeric, 1), round((total_plan_time * 1000 / greatest(calls, 1))::numeric, 1), calls || ' calls ' || plans || ' plans',  left(regexp_replace(query, '\s+', ' ', 'g'), 60))
                 FROM pg_stat_statements WHERE query !~* 'pg_stat_statements|EXISTS \(SELECT 1 FROM inbox_events|bench_wait_drained|pg_sleep'
                 ORDER BY total_exec_time DESC LIMIT 14"
}
phase() { [[ $phases == *$1* ]]; }
start_receiver() { [ -n "${receiver:-}" ] || { "$bin/hookbox-receiver" 2>/dev/null & receiver=$!; sleep 1; }; }
peak_rss() { awk '/VmHWM/ {printf "%.1f MiB", $2 / 1024}' "/proc/$1/status"; }
# cpu_ticks PID...: CPU time the processes have used (user + system, in
# clock ticks); machine_ticks: the machine's busy and idle ticks (idle with
# I/O wait). Read before and after phase (b), for its CPU per event.
cpu_ticks() { for p in "$@"; do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done | awk '{s += $1} END {print s + 0}'; }
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat; }
# The bench cluster's processes: its postmaster and every child.
pg_pids() { local main; main=$(head -1 "$pgdata/postmaster.pid"); echo "$main" $(pgrep -P "$main"); }

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $("$pg_bin/postgres" --version)"

payload=$(python3 -c 'import json; print(json.dumps({"uid": "U", "integration_id": "1", "event": {"type": "psychometric_score.complete", "details": {"score": 700, "notes": "x" * 800}}}))')
cat > "$work/naive.sql" <<SQL
BEGIN;
WITH event AS (
    INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256)
    VALUES ($v7, 'begini', 'sandbox', gen_random_uuid()::text, 'psychometric_score.complete', md5(random()::text))
    ON CONFLICT (source, event_key) DO NOTHING
    RETURNING id)
INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
SELECT id, convert_to('$payload', 'UTF8'), true, '{}' FROM event;
INSERT INTO inbox_deliveries (source, remote_addr, outcome, payload_sha256, status_code)
VALUES ('begini', '127.0.0.1', 'accepted', md5(random()::text), 200);
COMMIT;
SQL
phase a && echo "== (a) the ceiling: pgbench, one transaction per event (event ON CONFLICT DO NOTHING, its payload, a delivery row)"
phase a && for clients in 16 64; do
    reset
    tps=$(as_pg "$pg_bin/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -c "$clients" -j 2 -T "$seconds" -f "$work/naive.sql" postgres 2>/dev/null \
        | awk '/^tps/ {print $3; exit}')
    echo "pgbench $clients clients: $tps events/s"
done
# The batched limit: every event batched perfectly, 32 events and their
# delivery rows per transaction, 4 clients. What ingest is compared with.
cat > "$work/batched.sql" <<SQL
BEGIN;
WITH event AS (
    INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256)
    SELECT $v7, 'begini', 'sandbox', gen_random_uuid()::text, 'psychometric_score.complete', md5(random()::text)
    FROM generate_series(1, 32)
    ON CONFLICT (source, event_key) DO NOTHING
    RETURNING id)
INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
SELECT id, convert_to('$payload', 'UTF8'), true, '{}' FROM event;
INSERT INTO inbox_deliveries (source, remote_addr, outcome, payload_sha256, status_code)
SELECT 'begini', '127.0.0.1', 'accepted', md5(random()::text), 200 FROM generate_series(1, 32);
COMMIT;
SQL
batched_pgbench() {
    reset
    local tps
    tps=$(as_pg "$pg_bin/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -c 4 -j 2 -T "$seconds" -f "$work/batched.sql" postgres 2>/dev/null \
        | awk '/^tps/ {print $3; exit}')
    python3 -c "print(f'{$tps * 32:.0f}')"
}
if phase a; then
    batched_rate=$(batched_pgbench)
    echo "pgbench batched, 32 events per transaction, 4 clients: $batched_rate events/s"
fi

if phase b; then
reset
start_receiver
psql -At -c "SELECT pg_stat_statements_reset()" >/dev/null
# INGEST_CLIENT=wrk: the events are made and signed before the clock starts
# and wrk sends them (the generator shares the two cores with what it
# measures, and wrk takes less of them). wrk's latency samples are not
# trusted here (BENCHMARKS.md), so latency comes from a probe beside it.
# The default where wrk is installed (Debian's package wrk); INGEST_CLIENT=loadtest
# measures with hookbox loadtest alone, on all 64 connections.
ingest_client=${INGEST_CLIENT:-$(command -v wrk >/dev/null && echo wrk || echo loadtest)}
if [ "$ingest_client" = loadtest ] && [ -z "${INGEST_CLIENT:-}" ]; then
    echo "!! wrk not found: phase (b) measured with hookbox loadtest alone, whose own CPU lowers the rate (apt-get install wrk) !!" >&2
fi
if [ "$ingest_client" = wrk ]; then
    echo "== (b) receiver ingest: wrk, prepared signed events, 60 connections, and a latency probe on 4 more, ${seconds}s"
    python3 bench/signed_events.py "$((seconds * 16000))" "$BEGINI_API_KEY" > "$work/events.tsv"
    profile ingest 10
    pg_before=$(cpu_ticks $(pg_pids)); receiver_before=$(cpu_ticks "$receiver"); read -r busy_before idle_before < <(machine_ticks)
    # The probe: hookbox loadtest in open loop at PROBE_RATE (200/s), its
    # requests sent on a clock of their own, so that each samples what a
    # request meets at a moment the load does not choose (no coordinated
    # omission), measured on the client from the request sent to the answer's
    # status line and headers. It shares the receiver and its batches with
    # wrk's requests.
    "$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
        --connections 4 --rate "${PROBE_RATE:-200}" --duration "${seconds}s" > "$work/probe.txt" &
    probe=$!
    WRK_CONNECTIONS=60 wrk -t2 -c60 -d"${seconds}s" -s bench/ingest.lua "http://127.0.0.1:$rport/webhooks/begini" -- "$work/events.tsv" 2 \
        | grep -E 'requests in|errors|latency|WARNING' | tee "$work/wrk.txt" | sed 's/^/  wrk: /'
    wait "$probe"
    pg_after=$(cpu_ticks $(pg_pids)); receiver_after=$(cpu_ticks "$receiver"); read -r busy_after idle_after < <(machine_ticks)
    sed 's/^/  probe: /' "$work/probe.txt"
    # Both clients' requests, in hookbox loadtest's format, for the ratio below.
    python3 - "$work/wrk.txt" "$work/probe.txt" > "$work/ingest.txt" <<'PY'
import re, sys
runs = [re.search(r"(\d+) requests in ([0-9.]+)s", open(f).read()) for f in sys.argv[1:]]
requests = sum(int(r[1]) for r in runs)
seconds = max(float(r[2]) for r in runs)
print(f"{requests} requests in {seconds:.1f}s: {requests / seconds:.0f}/s")
PY
    sed 's/^/  both: /' "$work/ingest.txt"
    echo "  stored: $(psql -At -c "SELECT count(*) FILTER (WHERE outcome = 'accepted') || ' accepted, ' || count(*) FILTER (WHERE outcome <> 'accepted') || ' other deliveries' FROM inbox_deliveries")"
    # Where the machine's time went, per accepted event (a server process
    # that ended during the run is not counted; none does).
    python3 - "$(psql -At -c "SELECT count(*) FROM inbox_deliveries WHERE outcome = 'accepted'")" "$(getconf CLK_TCK)" \
        "$((pg_after - pg_before))" "$((receiver_after - receiver_before))" "$((busy_after - busy_before))" "$((idle_after - idle_before))" <<'PY'
import sys
events, hz, pg, receiver, busy, idle = (int(v) for v in sys.argv[1:])
us = lambda ticks: f"{ticks * 1e6 / hz / max(events, 1):.0f} us"
print(f"  machine time per accepted event: PostgreSQL {us(pg)}, receiver {us(receiver)}, "
      f"the rest (wrk, the probe, the kernel's own) {us(busy - pg - receiver)}, idle {us(idle)}")
PY
    # The receiver's own clock: from the delivery handed to the batch to its
    # commit (hookbox_ingest_seconds), the part of a request that waits.
    curl -s "http://127.0.0.1:$aport/metrics" | python3 -c '
import re, sys
text = sys.stdin.read()
buckets = {float(m[0]): int(float(m[1])) for m in re.findall(r"hookbox_ingest_seconds_bucket\{[^}]*le=\"([0-9.]+)\"\} ([0-9.e+]+)", text)}
total = max(buckets.values())
mean = sum(float(v) for v in re.findall(r"hookbox_ingest_seconds_sum\{[^}]*\} ([0-9.e+-]+)", text)) / total
batches = [float(v) for v in re.findall(r"hookbox_ingest_batch_size_(?:sum|count) ([0-9.e+-]+)", text)]
print("  receiver, handed to the batch -> committed: " + ", ".join(
    f"{share:.2%} within {le * 1000:g} ms" for le, share in ((le, n / total) for le, n in sorted(buckets.items())) if le in (0.01, 0.025, 0.05))
    + f"; mean {mean * 1000:.2f} ms" + (f"; mean batch {batches[0] / batches[1]:.1f} deliveries" if len(batches) == 2 else ""))'
else
    echo "== (b) receiver ingest: hookbox loadtest, 64 connections, ${seconds}s"
    profile ingest 10
    "$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
        --connections 64 --duration "${seconds}s" | tee "$work/ingest.txt" | sed 's/^/  /'
fi
echo "  receiver peak RSS: $(peak_rss "$receiver")"
if [ -n "${batched_rate:-}" ]; then
    ingest_rate=$(grep -oE 'requests in [0-9.]+s: [0-9]+/s' "$work/ingest.txt" | head -1 | grep -oE '[0-9]+/s' | tr -d '/s')
    [ -n "$ingest_rate" ] && echo "  ingest / batched-SQL limit, same run: $(python3 -c "print(f'{$ingest_rate / $batched_rate:.2f}')")"
fi
accepted=$(psql -At -c "SELECT count(*) FROM inbox_deliveries WHERE outcome = 'accepted'")
echo "  database time per accepted event, by statement (pg_stat_statements):"
statement_costs "$accepted"
profile_report ingest
# This host's commit speed drifts from one minute to the next, so the
# reference is measured again right after ingest, and the ratio is also
# given against the mean of the two runs that bracket it.
if [ -n "${batched_rate:-}" ] && [ -n "${ingest_rate:-}" ]; then
    batched_after=$(batched_pgbench)
    echo "  pgbench batched again, right after ingest: $batched_after events/s"
    echo "  ingest / batched-SQL limit, bracketed (mean of before and after): $(python3 -c "print(f'{$ingest_rate / (($batched_rate + $batched_after) / 2):.2f}')")"
fi
fi

if phase s; then
echo "== (s) storage: bytes per stored event (tables, indexes and TOAST), after ingest and drain"
# Every relation an event's rows live in: the event, its payload, its
# deliveries and attempts, each with its partitions, indexes and TOAST.
storage_per_event() {
psql -c "VACUUM inbox_event_state, inbox_payloads, inbox_deliveries, inbox_attempts" -c "CHECKPOINT" >/dev/null
psql -At -c "WITH parts AS (
        SELECT c.oid FROM pg_class c
        WHERE c.relname IN ('inbox_event_state', 'inbox_payloads', 'inbox_deliveries', 'inbox_attempts')
        UNION
        SELECT i.inhrelid FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname IN ('inbox_payloads', 'inbox_deliveries', 'inbox_attempts')
    ), events AS (
        SELECT count(*) AS n, avg(octet_length(payload)) AS payload FROM inbox_events
    )
    SELECT format('  $1: %s events, payload %s bytes on average; stored: %s bytes per event = %sx the payload (events %s, payloads %s, deliveries %s, attempts %s per event)',
        e.n, round(e.payload), round(sum(pg_total_relation_size(p.oid)) / e.n),
        round(sum(pg_total_relation_size(p.oid)) / e.n / e.payload, 2),
        round(pg_total_relation_size('inbox_event_state') / e.n::numeric),
        round((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = 'inbox_payloads'::regclass) / e.n),
        round((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = 'inbox_deliveries'::regclass) / e.n),
        round((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = 'inbox_attempts'::regclass) / e.n))
    FROM parts p, events e GROUP BY e.n, e.payload"
}
# A backlog: everything received first, then drained (every event's row is
# rewritten twice after its page filled: the worst case for the event rows).
reset
start_receiver
"$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
    --connections 32 --duration "${STORAGE_SECONDS:-20}s" | grep -E 'requests in' | sed 's/^/  /'
"$bin/hookbox-worker" 2>/dev/null & worker=$!
wait_drained
kill "$worker"; wait "$worker" 2>/dev/null || true
storage_per_event "backlog, then drained"
# Steady: the worker drains while events arrive, as in service.
reset
"$bin/hookbox-worker" 2>/dev/null & worker=$!
"$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
    --connections 32 --duration "${STORAGE_SECONDS:-20}s" | grep -E 'requests in' | sed 's/^/  /'
wait_drained
kill "$worker"; wait "$worker" 2>/dev/null || true
storage_per_event "drained as received"
# In service: a steady 1,000 events/s for STEADY_SECONDS (180), drained as
# they come, with autovacuum as configured by default. What each further
# event adds once the tables are past their start: the growth of every
# relation from the first minute's end to the run's end, per event stored
# in between (no VACUUM of ours: what a running system grows by).
reset
"$bin/hookbox-worker" 2>/dev/null & worker=$!
sizes() {
    psql -At -c "SELECT (SELECT count(*) FROM inbox_event_state),
        pg_total_relation_size('inbox_event_state'),
        (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_payloads')),
        (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_deliveries')),
        (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('inbox_attempts'))"
}
"$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
    --connections 32 --rate 1000 --duration "${STEADY_SECONDS:-180}s" > "$work/steady.txt" &
loader=$!
sleep 60
first=$(sizes)
wait "$loader"
last=$(sizes)
wait_drained
kill "$worker"; wait "$worker" 2>/dev/null || true
payload_avg=$(psql -At -c "SELECT avg(octet_length(payload)) FROM inbox_events")
python3 - "$first" "$last" "$payload_avg" <<'PY'
import sys
a = [int(x) for x in sys.argv[1].split('|')]
b = [int(x) for x in sys.argv[2].split('|')]
n = b[0] - a[0]
parts = [(b[i] - a[i]) / n for i in range(1, 5)]
total = sum(parts)
print(f"  in service, 1,000 events/s: {n} events after the first minute; each added {total:.0f} bytes"
      f" = {total / float(sys.argv[3]):.2f}x the payload (events {parts[0]:.0f}, payloads {parts[1]:.0f},"
      f" deliveries {parts[2]:.0f}, attempts {parts[3]:.0f})")
PY
fi

if phase d; then
echo "== (d) end to end at 1,000 events/s: the 200 -> the handler runs"
reset
start_receiver
psql -At -c "SELECT pg_stat_statements_reset()" >/dev/null
"$bin/hookbox-worker" 2>/dev/null & worker=$!
sleep 1
profile e2e 10
"$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
    --connections 32 --rate 1000 --duration "${seconds}s" --acks "$work/acks.csv" | sed 's/^/  /'
sleep 3
# The loadtest's clock and the database's are this machine's one clock.
psql -c "CREATE TABLE acks (event_id uuid, at_us bigint)" -c "\\copy acks FROM '$work/acks.csv' CSV"
psql -At -c "SELECT format('  200 -> handler ran (ms): p50 %s  p90 %s  p99 %s  max %s  (%s events)',
        round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 2),
        round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(max(ms)::numeric, 2), count(*))
    FROM (SELECT (extract(epoch FROM s.at) * 1e6 - k.at_us) / 1000 AS ms
          FROM acks k JOIN side_effects s USING (event_id)) gaps"
# By 5-s window of the run, to tell a steady cost from one that grows.
psql -At -c "SELECT '  by 5-s window, p50/p99 (ms): ' || string_agg(format('%s/%s', round(p50::numeric, 1), round(p99::numeric, 1)), '  ' ORDER BY w)
    FROM (SELECT w, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50, percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
          FROM (SELECT (k.at_us - min(k.at_us) OVER ()) / 5000000 AS w, (extract(epoch FROM s.at) * 1e6 - k.at_us) / 1000 AS ms
                FROM acks k JOIN side_effects s USING (event_id)) g GROUP BY w) x"
psql -c "DROP TABLE acks"
psql -At -c "SELECT format('  stored (statement start) -> claimed (ms): p50 %s  p99 %s  max %s  (%s events)',
        round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2),
        round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(max(ms)::numeric, 2), count(*))
    FROM (SELECT extract(epoch FROM a.started_at - e.received_at)::float8 * 1000 AS ms
          FROM inbox_events e JOIN inbox_attempts a ON a.event_id = e.id AND a.attempt = 1) gaps"
echo "  database time per event, by statement (pg_stat_statements):"
statement_costs "$((seconds * 1000))"
kill "$worker"; wait "$worker" 2>/dev/null || true
profile_report e2e
fi

# drain LABEL ORDERING_KEYS: stores $events events (with an ordering key out of
# ORDERING_KEYS keys, or none for 0), starts a worker, waits until every event is
# done; prints the rate and sets $rate.
drain() {
    # NO_RESET keeps what is stored, but the drain still starts after a
    # checkpoint, as after a reset (a checkpoint during the drain would make
    # every page's first write a full-page image in the WAL).
    if [ -n "${NO_RESET:-}" ]; then psql -q -c "CHECKPOINT"; else reset; fi
    # Received one after another (due in that order), as a receiver stores them:
    # the state rows and their payloads (in the partition of their id). Keys
    # are new to the run (KEY_PREFIX), so that phase (g) can drain on top of
    # stored events.
    psql -c "WITH e AS (
                 INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256,
                                                received_at, next_attempt_at, ordering_key, ordered_at, ordering_seq, dead_blocks, skip_if_stale)
                 SELECT $v7, 'begini', 'sandbox', '${KEY_PREFIX:-k}' || g, 'psychometric_score.complete', md5(g::text),
                        now() - ($events - g) * interval '1 microsecond', now() - ($events - g) * interval '1 microsecond',
                        CASE WHEN $2 > 0 THEN 'U' || (g % $2) END, CASE WHEN $2 > 0 THEN now() + g * interval '1 microsecond' END,
                        CASE WHEN $2 > 0 THEN g END, CASE WHEN $2 > 0 THEN true END, CASE WHEN $2 > 0 THEN false END
                 FROM generate_series(1, $events) g
                 RETURNING id, event_key)
             INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
             SELECT id, convert_to(p, 'UTF8'), true, '{}'
             FROM e, LATERAL (SELECT format('{\"uid\":\"U%s\",\"event\":{\"type\":\"psychometric_score.complete\"}}', event_key) AS p) x"
    psql -c "VACUUM ANALYZE inbox_event_state, inbox_payloads"
    psql -At -c "SELECT pg_stat_statements_reset()" >/dev/null
    start=$(date +%s.%N)
    # WORKERS=n: n worker processes share the drain (phase m).
    workers=()
    for _ in $(seq 1 "${WORKERS:-1}"); do "$bin/hookbox-worker" 2>/dev/null & workers+=($!); done
    worker=${workers[0]}
    profile "$1" 5
    wait_drained
    end=$(date +%s.%N)
    rate=$(python3 -c "print(f'{$events / ($end - $start):.0f}')")
    echo "  drained $events events in $(python3 -c "print(f'{$end - $start:.1f}')")s: $rate events/s"
    echo "  side effects: $(psql -At -c "SELECT count(*) || ' rows, ' || count(DISTINCT event_id) || ' distinct' FROM side_effects")"
    echo "  worker peak RSS: $(peak_rss "$worker")"
    echo "  database time per drained event, by statement (pg_stat_statements):"
    statement_costs "$events"
    kill "${workers[@]}"; wait "${workers[@]}" 2>/dev/null || true
    workers=()
    profile_report "$1"
}

if phase c; then
echo "== (c) worker drain: $events stored events through a sql handler"
drain drain 0
unordered_rate=$rate
fi

if phase w; then
echo "== (w) graphile-worker 0.17.3, batched: $events stored jobs, each one INSERT"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "!! phase (w) SKIPPED: node and npm are needed (bench/graphile runs graphile-worker) !!" >&2
    echo "  SKIPPED: node or npm not found"
else
    [ -d bench/graphile/node_modules ] || (cd bench/graphile && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    reset
    psql -c "CREATE TABLE IF NOT EXISTS side_effects_graphile (job_id bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())" \
         -c "TRUNCATE side_effects_graphile" -c "CHECKPOINT"
    # The runner enqueues (not timed), resets pg_stat_statements and times
    # graphile-worker from its start until its job table is empty.
    GRAPHILE_READY_SQL="SELECT pg_stat_statements_reset()" node bench/graphile/drain.js "$events" | tee "$work/graphile.txt" | sed 's/^/  /'
    echo "  database time per drained job, by statement (pg_stat_statements):"
    statement_costs "$events"
    graphile_rate=$(grep -oE '[0-9]+ jobs/s' "$work/graphile.txt" | grep -oE '[0-9]+')
    if [ -n "${unordered_rate:-}" ] && [ -n "$graphile_rate" ]; then
        echo "  hookbox drain / graphile-worker batched drain, same run: $(python3 -c "print(f'{$unordered_rate / $graphile_rate:.2f}')")"
    fi
fi
fi

if phase o; then
echo "== (o) worker drain with per-key ordering: $events stored events over 10,000 keys"
drain ordered 10000
if [ -n "${unordered_rate:-}" ]; then
    echo "  ordered / unordered drain, same run: $(python3 -c "print(f'{$rate / $unordered_rate:.2f}')")"
fi
# Order held: for every key, side effects in the order of ordered_at.
echo "  keys whose side effects are out of order: $(psql -At -c "SELECT count(*) FROM (
        SELECT e.ordering_key, s.at, lag(e.ordered_at) OVER (PARTITION BY e.ordering_key ORDER BY s.at, e.ordered_at) AS before, e.ordered_at
        FROM side_effects s JOIN inbox_events e ON e.id = s.event_id) x WHERE before > ordered_at")"
fi

if phase g; then
stored=${STORED:-10000000}
echo "== (g) cost as the work grows: ingest and drain on an empty database, then with $stored finished events stored"
# ingest_and_drain LABEL: ingest for $seconds (64 connections, no worker),
# then drain $events stored events; leaves ingest_rate and rate.
ingest_and_drain() {
    start_receiver
    "$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:$rport/webhooks/begini" \
        --connections 64 --duration "${seconds}s" > "$work/ingest-$1.txt"
    grep -E 'requests in|latency' "$work/ingest-$1.txt" | sed "s/^/  $1 ingest: /"
    ingest_rate=$(grep -oE 'requests in [0-9.]+s: [0-9]+/s' "$work/ingest-$1.txt" | head -1 | grep -oE '[0-9]+/s' | tr -d '/s')
    # What was ingested is processed first, so that the drain starts from stored events only.
    "$bin/hookbox-worker" 2>/dev/null & worker=$!
    wait_drained
    kill "$worker"; wait "$worker" 2>/dev/null || true
    # What else the server did during the drain: checkpoints, and the tables
    # autovacuum worked on (sampled each second).
    checkpoint_counts() { psql -At -F ' ' -c "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint FROM pg_stat_bgwriter"; }
    read -r checkpoints_before buffers_before <<< "$(checkpoint_counts)"
    (while :; do psql -At -c "SELECT relid::regclass FROM pg_stat_progress_vacuum" 2>/dev/null; sleep 1; done > "$work/vacuum-$1.txt") & sampler=$!
    NO_RESET=1 KEY_PREFIX="$1-" drain "$1" 0 > "$work/drain-$1.txt"
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    sed "s/^ /  $1/" "$work/drain-$1.txt"
    read -r checkpoints_after buffers_after <<< "$(checkpoint_counts)"
    echo "  $1 drain: $(( checkpoints_after - checkpoints_before )) checkpoints, $(( buffers_after - buffers_before )) buffers written by them (and the checkpoint before it)"
    echo "  $1 drain: autovacuum seen (seconds, table): $(sort "$work/vacuum-$1.txt" | uniq -c | sort -rn | awk '{printf "%s %s; ", $1, $2}')"
}
reset
ingest_and_drain empty
empty_ingest=$ingest_rate; empty_drain=$rate
# Finished events received over the last 30 days (in the first partitions,
# as history is): each with its payload (974 bytes), a delivery and an
# attempt. A million per statement.
fill_start=$(date +%s)
for chunk in $(seq 0 $(( (stored - 1) / 1000000 ))); do
    n=$(( stored - chunk * 1000000 < 1000000 ? stored - chunk * 1000000 : 1000000 ))
    psql -q -c "WITH e AS (
        INSERT INTO inbox_event_state (id, source, environment, event_key, event_type, payload_sha256, status, attempts,
                                       received_at, next_attempt_at, processed_at)
        SELECT (left(inbox_uuid_at(t)::text, 14) || right(gen_random_uuid()::text, 22))::uuid, 'begini', 'sandbox',
               'stored-$chunk-' || g, 'psychometric_score.complete', encode(sha256(g::text::bytea), 'hex'),
               'succeeded', 1, t, t, t
        FROM generate_series(1, $n) g,
             LATERAL (SELECT now() - interval '30 days' + ($chunk * 1000000 + g) * (interval '25 days' / $stored) AS t) x
        RETURNING id, received_at, event_key
    ), p AS (
        INSERT INTO inbox_payloads (event_id, payload, payload_is_json, headers)
        SELECT id, convert_to(format('{\"uid\":\"%s\",\"event\":{\"type\":\"psychometric_score.complete\",\"details\":{\"score\":700,\"notes\":\"%s\"}}}',
                                     event_key, repeat(md5(event_key), 27)), 'UTF8'), true, '{\"content-type\":\"application/json\"}'
        FROM e
    ), d AS (
        INSERT INTO inbox_deliveries (received_at, source, remote_addr, outcome, event_id, payload_sha256, status_code)
        SELECT received_at, 'begini', '127.0.0.1', 'accepted', id, md5(event_key), 200 FROM e
    )
    INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler, started_at, finished_at, outcome)
    SELECT id, 1, 'fill', 'sql', received_at, received_at, 'succeeded' FROM e"
done
psql -q -c "VACUUM ANALYZE" -c "CHECKPOINT"
echo "  stored $(psql -At -c "SELECT count(*) FROM inbox_event_state") events in $(( $(date +%s) - fill_start ))s; database $(psql -At -c "SELECT pg_size_pretty(pg_database_size(current_database()))")"
ingest_and_drain stored
echo "  with $stored stored / empty, same run: ingest $(python3 -c "print(f'{$ingest_rate / $empty_ingest:.2f}')"), drain $(python3 -c "print(f'{$rate / $empty_drain:.2f}')")"
fi

if phase k; then
echo "== (k) one hot key: 5,000 ordered events of one key, the commit of one -> the start of the next"
events_before=$events
events=5000
drain hotkey 1
events=$events_before
# From one event's finished_at (taken in its completing transaction, just
# before the COMMIT) to the moment the next event's handler ran (its side
# effect's clock_timestamp()): the COMMIT, the next claim and the handler's
# start, so an upper bound of commit -> next start.
psql -At -c "SELECT format('  finished -> next handler ran (ms): p50 %s  p90 %s  p99 %s  max %s  (%s gaps)',
        round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 2),
        round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(max(ms)::numeric, 2), count(*))
    FROM (SELECT extract(epoch FROM s.at - lag(a.finished_at) OVER (ORDER BY e.ordered_at)) * 1000 AS ms
          FROM inbox_events e JOIN inbox_attempts a ON a.event_id = e.id AND a.attempt = 1
          JOIN side_effects s ON s.event_id = e.id) gaps WHERE ms IS NOT NULL"
fi

if phase m; then
echo "== (m) one PostgreSQL, more processes: ingest with 1, 2 and 4 receivers, drain with 1, 2 and 4 workers"
for n in 1 2 4; do
    reset
    kill "${receiver:-}" 2>/dev/null || true; receiver=""
    receivers=(); ports=()
    for i in $(seq 1 "$n"); do
        # Each receiver its own port and its own admin port: a second one on
        # the same admin port exits at start, and its share of the load would
        # then count refused connections as requests.
        p=$(free_port)
        a=$(free_port)
        sed -e "s/127.0.0.1:$rport/127.0.0.1:$p/" -e "s/127.0.0.1:$aport/127.0.0.1:$a/" \
            "$work/hookbox.toml" > "$work/receiver$i.toml"
        HOOKBOX_CONFIG="$work/receiver$i.toml" "$bin/hookbox-receiver" 2>/dev/null & receivers+=($!)
        ports+=("$p")
    done
    sleep 1
    for pid in "${receivers[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "!! a receiver of $n exited at start: phase (m) stops here" >&2; exit 1; }
    done
    # The same 64 connections in all, split between the receivers.
    loads=()
    for i in $(seq 1 "$n"); do
        "$bin/hookbox" loadtest --source begini --url "http://127.0.0.1:${ports[$((i - 1))]}/webhooks/begini" \
            --connections $((64 / n)) --duration "${seconds}s" > "$work/m$i.txt" & loads+=($!)
    done
    wait "${loads[@]}"
    total=$(cat "$work"/m*.txt | grep -oE 'requests in [0-9.]+s: [0-9]+/s' | grep -oE '[0-9]+/s' | tr -d '/s' | python3 -c 'import sys; print(sum(int(l) for l in sys.stdin))')
    echo "  $n receiver(s), 64 connections in all: $total events/s ($(cat "$work"/m*.txt | grep -oE 'p99 [0-9.]+' | sed 's/$/ ms/' | paste -sd' ' -))"
    kill "${receivers[@]}"; wait "${receivers[@]}" 2>/dev/null || true
    receivers=(); rm -f "$work"/m*.txt
done
for n in 1 2 4; do
    echo "  $n worker(s):"
    WORKERS=$n drain "workers$n" 0 | grep -E 'drained' | sed 's/^/  /'
done
fi
