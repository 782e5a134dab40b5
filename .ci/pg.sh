#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the shared-ticket-database tests and print
# `export MCAST_TEST_PG_URL=...` and `export MCAST_TEST_PG_CA=...` (eval them). Usage:
# eval "$(bash .ci/pg.sh start DIR [PORT])"; bash .ci/pg.sh stop DIR. Installs Debian's
# postgresql and openssl packages when they are missing (root). Runs the server as the
# `postgres` user when started as root (initdb refuses root), as the current user otherwise;
# listens on 127.0.0.1 only, data under DIR. TLS: a throw-away CA (DIR/tls/ca.pem, exported as
# MCAST_TEST_PG_CA) signs a server certificate for 127.0.0.1, ::1 and localhost; over TCP only
# TLS connections are accepted (pg_hba.conf `hostssl`, trust authentication), so a plaintext
# one is refused. The Unix socket in DIR (trust) is for set-up.
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
    if ! command -v openssl >/dev/null 2>&1; then
      if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >&2
      else
        echo "openssl is not installed (apt-get install openssl)" >&2
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
    tls="$dir/tls"
    if [ ! -f "$tls/server.crt" ]; then
      mkdir -p "$tls"
      cat >"$tls/ca.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = mcast throw-away test CA
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
CNF
      cat >"$tls/server.ext" <<'EXT'
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
      ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      openssl req -x509 -new -config "$tls/ca.cnf" -extensions v3_ca $ec \
        -keyout "$tls/ca.key" -out "$tls/ca.pem" -days 3650 2>/dev/null
      openssl req -new $ec -subj /CN=localhost -keyout "$tls/server.key" \
        -out "$tls/server.csr" 2>/dev/null
      openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 3650 -extfile "$tls/server.ext" -out "$tls/server.crt" 2>/dev/null
      chmod 0644 "$tls/ca.pem" "$tls/server.crt"
      chmod 0600 "$tls/server.key" "$tls/ca.key"
      if [ "$(id -u)" = 0 ]; then chown postgres: "$tls/server.key" "$tls/server.crt"; fi
    fi
    # TCP only over TLS (a plaintext connection finds no entry and is refused); the Unix
    # socket for the set-up below.
    cat >"$dir/pg_hba.conf" <<'HBA'
local   all  all                 trust
hostssl all  all  127.0.0.1/32   trust
hostssl all  all  ::1/128        trust
HBA
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/pg_hba.conf"; fi
    as_pg "'$bin/pg_ctl' -D '$dir' -l '$dir/server.log' -w -t 60 \
      -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
      -c ssl_cert_file='$tls/server.crt' -c ssl_key_file='$tls/server.key'\" start" >&2
    psql="$bin/psql -h $dir -p $port -U postgres -v ON_ERROR_STOP=1 -qtA"
    if [ "$($psql -c "SELECT 1 FROM pg_roles WHERE rolname = 'mcast'")" != 1 ]; then
      $psql -c "CREATE ROLE mcast LOGIN" >&2
    fi
    if [ "$($psql -c "SELECT 1 FROM pg_database WHERE datname = 'mcast'")" != 1 ]; then
      $psql -c "CREATE DATABASE mcast OWNER mcast" >&2
    fi
    echo "export MCAST_TEST_PG_URL='host=127.0.0.1 port=$port user=mcast dbname=mcast'"
    echo "export MCAST_TEST_PG_CA='$tls/ca.pem'"
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
