#!/usr/bin/env bash
# Regenerates .sqlx/ (the offline query data) after a query or schema change,
# without sqlx-cli: migrates a scratch database with the files in migrations/,
# removes the old data and lets the query macros write it anew while every
# target is checked. Same result as `cargo sqlx prepare -- --all-targets`.
#
#   ADMIN_URL=postgres://postgres@127.0.0.1/postgres scripts/prepare-sqlx.sh
set -euo pipefail
cd "$(dirname "$0")/.."
admin=${ADMIN_URL:-postgres://postgres@127.0.0.1/postgres}
scratch="hookbox_prepare_$$"
psql -q "$admin" -c "CREATE DATABASE $scratch"
trap 'psql -q "$admin" -c "DROP DATABASE IF EXISTS $scratch WITH (FORCE)"' EXIT
url="${admin%/*}/$scratch"
for file in $(ls migrations/V*__*.sql | sort -t V -k 2 -n); do
    psql -q -1 -v ON_ERROR_STOP=1 "$url" -f "$file"
done
rm -f .sqlx/query-*.json
# The macros run again only when their crate is compiled again.
touch src/lib.rs tests/it/main.rs examples/*.rs
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" DATABASE_URL="$url" \
    cargo check --all-targets --quiet
echo "$(ls .sqlx | wc -l) queries in .sqlx/"
