#!/usr/bin/env bash
# Validates the deployment files: the compose file with docker-compose's own
# parser (no engine needed), and the systemd units with systemd-analyze against
# the binaries just built. Installs docker-compose from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The compose file reads secrets from .env; validate with the example one.
cp docker-compose.yml "$scratch/"
cp deploy/example.env "$scratch/.env"
mkdir -p "$scratch/deploy" && cp deploy/hookbox.toml "$scratch/deploy/"
(cd "$scratch" && docker-compose config --quiet)
echo "docker-compose.yml: valid"
if command -v systemd-analyze >/dev/null; then
    for unit in deploy/systemd/*.service; do
        sed "s|/usr/local/bin/|$PWD/target/debug/|g" "$unit" > "$scratch/$(basename "$unit")"
    done
    systemd-analyze verify "$scratch"/*.service
    echo "systemd units: valid"
fi
# Prometheus alerting rules, with Prometheus's own checker (Debian's package).
if ! command -v promtool >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
promtool check rules deploy/prometheus/alerts.yml
