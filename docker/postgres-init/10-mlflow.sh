#!/usr/bin/env bash
# PostgreSQL first start only (docker-entrypoint-initdb.d): the MLflow tracking database, owned by
# its own role. The Airflow database is the image's POSTGRES_DB, owned by POSTGRES_USER.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -v mlflow_password="$MLFLOW_DB_PASSWORD" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
