#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the shared-ticket-database tests and print
# `export MCAST_TEST_PG_URL=...` (eval it). Usage: eval "$(bash .ci/pg.sh start DIR [PORT])";
# bash .ci/pg.sh stop DIR. Installs Debian's postgresql package when it is missing (root).
# Runs the server as the `postgres` user when started as root (initdb refuses root), as the
# current user otherwise; listens on 127.0.0.1 only, trust authentication, data under DIR.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?data directory}
port=${3:-55432}

bindir() {
  local b
  for b in /usr/lib/postgresql/*/bin; do
    [ -x "$b/initdb" ] && { echo "$b"; return; }
  done
  command -v initdb >/dev/null 2>&1 && dirname "$(command -v initdb)"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

case $cmd in
  start)
    if [ -z "$(bindir)" ]; then
      if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq >&2
        # The package's own cluster is not needed (and not started in a container).
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
      else
        echo "PostgreSQL is not installed (apt-get install postgresql)" >&2
        exit 1
      fi
    fi
    bin=$(bindir)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
      chown postgres: "$dir"
    fi
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_pg "'$bin/initdb' -D '$dir' -A trust -U postgres --no-sync" >&2
    fi
    as_pg "'$bin/pg_ctl' -D '$dir' -l '$dir/server.log' -w -t 60 \
      -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off\" start" >&2
    psql="$bin/psql -h 127.0.0.1 -p $port -U postgres -v ON_ERROR_STOP=1 -qtA"
    if [ "$($psql -c "SELECT 1 FROM pg_roles WHERE rolname = 'mcast'")" != 1 ]; then
      $psql -c "CREATE ROLE mcast LOGIN" >&2
    fi
    if [ "$($psql -c "SELECT 1 FROM pg_database WHERE datname = 'mcast'")" != 1 ]; then
      $psql -c "CREATE DATABASE mcast OWNER mcast" >&2
    fi
    echo "export MCAST_TEST_PG_URL='host=127.0.0.1 port=$port user=mcast dbname=mcast'"
    ;;
  stop)
    bin=$(bindir)
    [ -f "$dir/postmaster.pid" ] && as_pg "'$bin/pg_ctl' -D '$dir' -m fast -w stop" >&2 || true
    ;;
  *)
    echo "usage: $0 start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
