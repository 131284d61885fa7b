#!/usr/bin/env bash
# How long the migration that partitions the history
# (migrations/V*__partitioned_history.sql) holds its locks on a filled
# database: a scratch database is migrated to the version before it, filled
# with ROWS events (1 KiB payloads), ROWS deliveries and ROWS attempts, then
# the migration is applied in one transaction, as `hookbox migrate` does,
# with each statement timed.
#   ADMIN_URL=postgres://postgres@127.0.0.1/postgres bash bench/migrate_partitioned.sh [ROWS]
# It takes ACCESS EXCLUSIVE on inbox_events, inbox_deliveries and
# inbox_attempts with its first statement and keeps them until it commits:
# the transaction's time is the time receivers and workers wait.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}
admin=${ADMIN_URL:-postgres://postgres@127.0.0.1/postgres}
scratch="hookbox_bench_migrate_$$"
psql -q "$admin" -c "CREATE DATABASE $scratch"
trap 'psql -q "$admin" -c "DROP DATABASE IF EXISTS $scratch WITH (FORCE)"' EXIT
url="${admin%/*}/$scratch"
target=$(ls migrations/V*__partitioned_history.sql)
target_version=$(basename "$target" | sed 's/^V\([0-9]*\)__.*/\1/')
for file in $(ls migrations/V*__*.sql | sort -t V -k 2 -n); do
    version=$(basename "$file" | sed 's/^V\([0-9]*\)__.*/\1/')
    [ "$version" -lt "$target_version" ] || continue
    psql -q -1 -v ON_ERROR_STOP=1 "$url" -f "$file"
done
echo "filling: $rows events, deliveries and attempts"
psql -q -v ON_ERROR_STOP=1 "$url" <<SQL
INSERT INTO inbox_events (id, source, environment, event_key, event_type, status, attempts, received_at,
                          processed_at, payload, payload_json, headers, payload_sha256)
SELECT gen_random_uuid(), 'begini', 'sandbox', 'key-' || g, 'application.complete', 'succeeded', 1,
       now() - interval '30 days' + g * interval '2 ms', now() - interval '30 days' + g * interval '2 ms',
       convert_to(repeat('x', 1024), 'UTF8'), '{"uid": 1}', '{"content-type": "application/json"}', md5(g::text)
FROM generate_series(1, $rows) g;
INSERT INTO inbox_deliveries (received_at, source, remote_addr, outcome, event_id, payload_sha256, status_code)
SELECT received_at, source, '192.0.2.1', 'accepted', id, payload_sha256, 200 FROM inbox_events;
INSERT INTO inbox_attempts (event_id, attempt, worker_id, handler, started_at, finished_at, outcome)
SELECT id, 1, 'worker-a', 'h', received_at, received_at + interval '5 ms', 'succeeded' FROM inbox_events;
VACUUM ANALYZE;
SQL
psql -q "$url" -c "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) AS size FROM pg_class
                    WHERE relname IN ('inbox_events', 'inbox_deliveries', 'inbox_attempts') ORDER BY relname"
# Timed statement by statement; the statements above 10 ms are printed.
start=$(date +%s.%N)
psql -1 -v ON_ERROR_STOP=1 "$url" -c '\timing on' -f "$target" 2>&1 \
    | awk '/^Time:/ { ms = $2 + 0; if (ms > 10) printf "  %10.1f ms  %s\n", ms, last } !/^Time:/ { if ($0 != "") last = $0 }'
end=$(date +%s.%N)
python3 -c "print(f'V$target_version on {$rows:,} rows of each table: {$end - $start:.2f} s in one transaction (the locks are held that long)')"
