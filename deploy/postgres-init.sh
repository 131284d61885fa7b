#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory:
# the application's role owns its database and is not a superuser. Its
# password comes from the environment (.env), never from a file in git.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v password="$HOOKBOX_DB_PASSWORD" <<'SQL'
CREATE ROLE hookbox LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE hookbox OWNER hookbox;
REVOKE ALL ON DATABASE hookbox FROM PUBLIC;
SQL
