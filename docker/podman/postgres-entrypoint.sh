#!/usr/bin/env bash
# First start (empty $PGDATA), as the official postgres image: a cluster whose superuser is
# POSTGRES_USER (password POSTGRES_PASSWORD, scram-sha-256 over TCP), the database POSTGRES_DB, then
# /docker-entrypoint-initdb.d/*.sh against a socket-only server. Then PostgreSQL on every interface.
set -euo pipefail
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_pg initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 > /dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  as_pg pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start > /dev/null
  if [[ "$db" != postgres ]]; then
    as_pg psql -v ON_ERROR_STOP=1 -q -U "$user" -d postgres -c "CREATE DATABASE \"$db\""
  fi
  for script in /docker-entrypoint-initdb.d/*.sh; do
    [[ -e "$script" ]] || continue
    echo "postgres-entrypoint: running $script"
    as_pg bash "$script"
  done
  as_pg pg_ctl -D "$PGDATA" -m fast -w stop > /dev/null
  echo "postgres-entrypoint: initialised $PGDATA"
fi
if [[ "${1:-}" == postgres ]]; then
  shift
  exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
