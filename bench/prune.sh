#!/usr/bin/env bash
# Prune of N finished events (default 1,000,000, 1 KiB payloads each) with the
# `hookbox prune` binary, against the server in ADMIN_URL (a scratch database
# is created and dropped):
#   ADMIN_URL=postgres://postgres@127.0.0.1/postgres [LAYOUT=...] bash bench/prune.sh [ROWS] [BIN]
# BIN defaults to target/debug/hookbox (prune's time is the database's: the
# client only loops over batches). LAYOUT says where the payloads are:
#   partition  received two days ago (UUIDv7 ids): their partition of
#              inbox_payloads is dropped whole (the default). That partition
#              (the first, made by the migration) ends at today's midnight,
#              so this layout prunes with --older-than 1s, not 1d.
#   default    ids that are not UUIDv7 (written by a script): in the DEFAULT
#              partition, pruned row by row
#   legacy     in the event rows, as before schema version 8: pruned row by row
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
layout=${LAYOUT:-partition}
case $layout in
    partition) id="inbox_uuid_at(now() - interval '2 days' + g * interval '1 ms')"; older_than=1s ;;
    default | legacy) id="gen_random_uuid()"; older_than=1d ;;
    *) echo "LAYOUT is partition, default or legacy" >&2; exit 2 ;;
esac
if [ "$layout" = legacy ]; then
    psql -q "$url" -c "
      INSERT INTO inbox_event_state (id, source, environment, event_key, status, processed_at, legacy_payload,
                                     legacy_payload_json, payload_sha256)
      SELECT $id, 'begini', 'sandbox', 'key-' || g, 'succeeded', now() - interval '2 days' + g * interval '1 ms',
             convert_to(repeat('x', 1024), 'UTF8'), '{\"uid\": 1}', md5(g::text)
      FROM generate_series(1, $rows) g;"
else
    psql -q "$url" -c "
      INSERT INTO inbox_event_state (id, source, environment, event_key, status, processed_at, payload_sha256)
      SELECT $id, 'begini', 'sandbox', 'key-' || g, 'succeeded', now() - interval '2 days' + g * interval '1 ms',
             md5(g::text)
      FROM generate_series(1, $rows) g;
      INSERT INTO inbox_payloads (event_id, payload, payload_json)
      SELECT id, convert_to(repeat('x', 1024), 'UTF8'), '{\"uid\": 1}' FROM inbox_event_state;"
fi
psql -q "$url" -c "VACUUM ANALYZE"
echo "pruning $rows payloads ($layout)"
start=$(date +%s.%N)
DATABASE_URL=$url RUST_LOG=warn "$bin" --config "$config" prune --older-than $older_than --batch-size 1000 --reason benchmark
end=$(date +%s.%N)
python3 -c "print(f'{$rows} payloads pruned in {$end - $start:.1f} s ({$rows / ($end - $start):,.0f} rows/s)')"
