#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 60): `bash fuzz/run.sh 3600`
# for a long run. Installs cargo-fuzz if it is missing. cargo-fuzz passes
# flags that need a nightly compiler; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them, so no other toolchain is needed.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1 SQLX_OFFLINE=true
for target in $(cargo fuzz list); do
    echo "-- fuzzing $target for ${seconds}s"
    cargo fuzz run "$target" --sanitizer none -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 3
    # cargo fuzz exits non-zero on a crash; pipefail carries it.
done
