#!/usr/bin/env bash
# Prune of N finished events (default 1,000,000, 1 KiB payloads each) with the
# `hookbox prune` binary, against the server in ADMIN_URL (a scratch database
# is created and dropped):
#   ADMIN_URL=postgres://postgres@127.0.0.1/postgres bash bench/prune.sh [ROWS] [BIN]
# BIN defaults to target/debug/hookbox (prune's time is the database's: the
# client only loops over batches).
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}
bin=${2:-target/debug/hookbox}
admin=${ADMIN_URL:-postgres://postgres@127.0.0.1/postgres}
scratch="hookbox_bench_prune_$$"
psql -q "$admin" -c "CREATE DATABASE $scratch"
trap 'psql -q "$admin" -c "DROP DATABASE IF EXISTS $scratch WITH (FORCE)"' EXIT
url="${admin%/*}/$scratch"
config=$(mktemp)
trap 'rm -f "$config"; psql -q "$admin" -c "DROP DATABASE IF EXISTS $scratch WITH (FORCE)"' EXIT
DATABASE_URL=$url RUST_LOG=warn "$bin" --config "$config" migrate >/dev/null 2>&1
psql -q "$url" -c "
  INSERT INTO inbox_events (id, source, environment, event_key, status, processed_at, payload, payload_json, payload_sha256)
  SELECT gen_random_uuid(), 'begini', 'sandbox', 'key-' || g, 'succeeded',
         now() - interval '2 days' + g * interval '1 ms', convert_to(repeat('x', 1024), 'UTF8'),
         '{\"uid\": 1}', md5(g::text)
  FROM generate_series(1, $rows) g;"
psql -q "$url" -c "VACUUM ANALYZE inbox_events"
echo "pruning $rows payloads"
start=$(date +%s.%N)
DATABASE_URL=$url RUST_LOG=warn "$bin" --config "$config" prune --older-than 1d --batch-size 1000 --reason benchmark >/dev/null
end=$(date +%s.%N)
python3 -c "print(f'{$rows} payloads pruned in {$end - $start:.1f} s ({$rows / ($end - $start):,.0f} rows/s)')"
