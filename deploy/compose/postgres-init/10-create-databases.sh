#!/bin/sh
# Runs once, when PostgreSQL's data directory is new (docker-entrypoint-initdb.d): one login role
# and one database per service, the database owned by its role, as in production where each
# service has its own DATABASE_URL and cannot read another's tables. The passwords come from
# deploy/compose/env/postgres.env (development-only values).
set -eu

for service in catalog enrollment billing issuance notifications; do
    variable="$(echo "$service" | tr '[:lower:]' '[:upper:]')_DB_PASSWORD"
    password="$(printenv "$variable")" || { echo "$variable is not set" >&2; exit 1; }
    psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v role="$service" -v password="$password" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
SQL
done
