#!/usr/bin/env bash
# Validates the deployment files: their safe defaults, the compose file with
# docker-compose's own parser (no engine needed), and the systemd units with
# systemd-analyze against the binaries just built. Installs docker-compose
# from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "deploy check: $*" >&2; exit 1; }
# Secrets stay out of git, out of the image and out of the compose file.
grep -qx '/\?\.env' .gitignore || fail ".env is not in .gitignore"
grep -qx '\.env' .dockerignore || fail ".env is not in .dockerignore"
grep -qx 'target' .dockerignore || fail "target is not in .dockerignore"
if grep -E 'PASSWORD: +[^$ ]' docker-compose.yml; then fail "a password is written in docker-compose.yml"; fi
if grep -E '://[^:/@]+:[^$@/]+@' docker-compose.yml; then fail "a URL in docker-compose.yml holds a password"; fi
grep -q 'POSTGRES_USER: postgres' docker-compose.yml || fail "the application must not be the database superuser"
# The application containers run unprivileged; the receiver is local by default.
for setting in 'read_only: true' 'cap_drop: \[ALL\]' 'no-new-privileges:true'; do
    [ "$(grep -c "$setting" docker-compose.yml)" -ge 3 ] || fail "docker-compose.yml: $setting missing"
done
grep -q '"${HOOKBOX_PUBLISH:-127.0.0.1:8080}:8080"' docker-compose.yml || fail "8080 must be published on 127.0.0.1 by default"
if grep -q curl Dockerfile docker-compose.yml; then fail "no curl in the image or its health checks"; fi
echo "deployment defaults: ok"
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
