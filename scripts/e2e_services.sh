#!/usr/bin/env bash
# Services for `make e2e` and `make mlflow-server`: a PostgreSQL cluster of its own under .e2e/pg
# (databases `mlflow`, `mlflow_auth` and `optuna`, 127.0.0.1 only, no Unix socket, scram-sha-256
# passwords) and an MLflow tracking server on it with MLflow's `basic-auth` app, proxying
# artifacts into .e2e/mlartifacts.
#
#   scripts/e2e_services.sh start|stop|status|env|clean
#
# `env` prints what a client needs: EMBFT_MLFLOW_URI, MLFLOW_TRACKING_USERNAME/PASSWORD,
# EMBFT_PG_URI (no password in it) and PGPASSFILE (.e2e/pgpass, read by libpq).
#
# Ports: E2E_PG_PORT / E2E_MLFLOW_PORT when given (a taken one is an error); otherwise `start` tries
# random loopback ports (PORT_MIN..PORT_MAX: below Linux's ephemeral range) until a server binds
# one itself (taken: another try, so two checkouts or CI jobs on one machine never collide), and
# records the ports in .e2e/ports.env, which `env` and `status` read.
#
# Secrets never go into the repository: E2E_MLFLOW_USER (admin), E2E_MLFLOW_PASSWORD,
# E2E_PG_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY are taken from the environment, or else
# generated at the first start, and kept in .e2e/secrets.env (mode 600, git-ignored) together with
# the basic-auth ini (.e2e/basic_auth.ini) and .e2e/pgpass. The MLflow admin and the database
# password are set when the stores are created: to change them, `clean` and start again.
#
# Settings (environment): E2E_DIR (.e2e), E2E_PG_PORT and E2E_MLFLOW_PORT (default: free ones, see
# above), E2E_PORT_MIN / E2E_PORT_MAX (20000 / 32767), E2E_MLFLOW_WORKERS (2), PG_BIN (PostgreSQL's
# bin folder; found in /usr/lib/postgresql/*/bin or on PATH), VENV (.venv). As root, PostgreSQL
# (which refuses to run as root) runs as the `postgres` user that Debian's package creates.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
E2E_DIR=${E2E_DIR:-$ROOT/.e2e}
case $E2E_DIR in /*) ;; *) E2E_DIR=$PWD/$E2E_DIR ;; esac  # server commands run from /
PG_PORT=${E2E_PG_PORT:-}          # empty: chosen at start, then read from $PORTS
MLFLOW_PORT=${E2E_MLFLOW_PORT:-}
PORT_MIN=${E2E_PORT_MIN:-20000}
PORT_MAX=${E2E_PORT_MAX:-32767}
PORT_TRIES=20
MLFLOW_WORKERS=${E2E_MLFLOW_WORKERS:-2}
VENV=${VENV:-$ROOT/.venv}
HOST=127.0.0.1
PG_USER=embft          # the cluster's superuser, password-authenticated (scram-sha-256)
PG_OS_USER=postgres    # who runs the server when this script runs as root
MLFLOW_PID=$E2E_DIR/mlflow.pid
MLFLOW_LOG=$E2E_DIR/mlflow.log
ARTIFACTS=$E2E_DIR/mlartifacts
SECRETS=$E2E_DIR/secrets.env
AUTH_INI=$E2E_DIR/basic_auth.ini
PGPASS=$E2E_DIR/pgpass
PORTS=$E2E_DIR/ports.env

mlflow_uri() { echo "http://$HOST:$MLFLOW_PORT"; }
pg_uri() { echo "postgresql://$PG_USER@$HOST:$PG_PORT"; }

die() { echo "e2e_services: $*" >&2; exit 1; }
say() { echo "e2e_services: $*"; }

pg_bin() {
    if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
    die "PostgreSQL server binaries (initdb) not found: apt-get install postgresql, or set PG_BIN"
}

is_root() { [ "$(id -u)" -eq 0 ]; }

random_secret() { "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

# The ports of the running services, as `start` recorded them (PG_PORT / MLFLOW_PORT).
load_ports() {
    # shellcheck disable=SC1090
    if [ -f "$PORTS" ]; then . "$PORTS"; fi
}

recorded_port() { (PG_PORT= MLFLOW_PORT= && load_ports && echo "${!1:-}"); }  # PG_PORT or MLFLOW_PORT

# record_port PG_PORT|MLFLOW_PORT PORT: update one of the two in $PORTS, keep the other.
record_port() {
    local pg mlflow
    pg=$(recorded_port PG_PORT)
    mlflow=$(recorded_port MLFLOW_PORT)
    case $1 in PG_PORT) pg=$2 ;; MLFLOW_PORT) mlflow=$2 ;; esac
    printf '%s\n' "# scripts/e2e_services.sh: ports of the running services" "PG_PORT=$pg" "MLFLOW_PORT=$mlflow" >"$PORTS"
}

# Credentials: the environment's, else those of an earlier start (.e2e/secrets.env), else new
# random ones; written back so that `env`, later starts and the clients agree.
load_secrets() {
    local env_user=${E2E_MLFLOW_USER:-} env_pw=${E2E_MLFLOW_PASSWORD:-} env_pg=${E2E_PG_PASSWORD:-}
    local env_key=${MLFLOW_FLASK_SERVER_SECRET_KEY:-}
    mkdir -p "$E2E_DIR"
    # shellcheck disable=SC1090
    if [ -f "$SECRETS" ]; then . "$SECRETS"; fi
    E2E_MLFLOW_USER=${env_user:-${E2E_MLFLOW_USER:-admin}}
    E2E_MLFLOW_PASSWORD=${env_pw:-${E2E_MLFLOW_PASSWORD:-$(random_secret)}}
    E2E_PG_PASSWORD=${env_pg:-${E2E_PG_PASSWORD:-$(random_secret)}}
    MLFLOW_FLASK_SERVER_SECRET_KEY=${env_key:-${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(random_secret)}}
    (
        umask 077
        printf '%s\n' "# scripts/e2e_services.sh: credentials of the local services (not for the repository)" \
            "E2E_MLFLOW_USER='$E2E_MLFLOW_USER'" "E2E_MLFLOW_PASSWORD='$E2E_MLFLOW_PASSWORD'" \
            "E2E_PG_PASSWORD='$E2E_PG_PASSWORD'" "MLFLOW_FLASK_SERVER_SECRET_KEY='$MLFLOW_FLASK_SERVER_SECRET_KEY'" >"$SECRETS"
        # libpq's password file: host:port:database:user:password (any port: it is chosen at start)
        echo "$HOST:*:*:$PG_USER:$E2E_PG_PASSWORD" >"$PGPASS"
    )
    export PGPASSFILE=$PGPASS
}

# MLflow's basic-auth app, its users in PostgreSQL too (on PG_PORT, known once it runs). An
# authenticated user may read everything (READ); only who created an experiment or model (or the
# admin) may change it.
write_auth_ini() {
    (
        umask 077
        cat >"$AUTH_INI" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://$PG_USER@$HOST:$PG_PORT/mlflow_auth
admin_username = $E2E_MLFLOW_USER
admin_password = $E2E_MLFLOW_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    )
}

# Run a PostgreSQL server command as its owner (from a folder it can enter: initdb and postgres
# complain about an unreadable cwd).
as_pg() {
    if is_root; then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

# The cluster's folder. As root it must belong to `postgres`, and `postgres` must be able to
# reach it: when the project sits under a private folder (e.g. /root), the cluster goes to a
# folder in /tmp instead and .e2e/pg links to it.
pg_dir() {
    local dir=$E2E_DIR/pg
    if [ -L "$dir" ] && [ ! -e "$dir" ]; then rm -f "$dir"; fi  # its /tmp folder is gone (reboot)
    if [ -e "$dir" ]; then readlink -f "$dir"; return; fi
    mkdir -p "$E2E_DIR"
    if ! is_root; then mkdir -p "$dir"; echo "$dir"; return; fi
    getent passwd "$PG_OS_USER" >/dev/null || die "running as root needs the '$PG_OS_USER' user (apt-get install postgresql)"
    mkdir -p "$dir"
    chown "$PG_OS_USER:" "$dir"
    if ! runuser -u "$PG_OS_USER" -- test -w "$dir" 2>/dev/null; then
        rmdir "$dir"
        local tmp
        tmp=$(mktemp -d "${TMPDIR:-/tmp}/embft-e2e-pg.XXXXXX")
        chown "$PG_OS_USER:" "$tmp"
        ln -s "$tmp" "$dir"
        dir=$tmp
    fi
    echo "$dir"
}

pg_running() {
    local dir=$1
    [ -f "$dir/data/PG_VERSION" ] && as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

psql_() { "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U "$PG_USER" "$@"; }

start_pg() {
    local bin dir
    bin=$(pg_bin)
    dir=$(pg_dir)
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        say "creating a PostgreSQL cluster in $dir/data"
        # The superuser's password from a file that only its owner reads, removed right after.
        local pwfile=$dir/initdb.pw
        (umask 077; echo "$E2E_PG_PASSWORD" >"$pwfile")
        if is_root; then chown "$PG_OS_USER:" "$pwfile"; fi
        as_pg "$bin/initdb" -D "$dir/data" -U "$PG_USER" --pwfile="$pwfile" --auth=scram-sha-256 \
            --no-locale -E UTF8 >"$dir/initdb.log" 2>&1 \
            || { rm -f "$pwfile"; cat "$dir/initdb.log" >&2; die "initdb failed"; }
        rm -f "$pwfile"
        # Loopback TCP only (no Unix socket: its default folder belongs to the system cluster);
        # durability off: the data is throwaway and the tests run faster without fsync.
        as_pg tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF

# e2e_services.sh
listen_addresses = '$HOST'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
password_encryption = scram-sha-256
full_page_writes = off
EOF
    fi
    # A cluster from before passwords (trust) would let anyone on the machine in.
    if as_pg grep -qE '^[^#]*[[:space:]]trust([[:space:]]|$)' "$dir/data/pg_hba.conf"; then
        die "the cluster in $dir/data allows trust logins; remove it with \`$0 clean\` and start again"
    fi
    if pg_running "$dir"; then
        # The port it listens on: line 4 of postmaster.pid.
        local running
        running=$(sed -n 4p "$dir/data/postmaster.pid")
        if [ -n "$PG_PORT" ] && [ "$PG_PORT" != "$running" ]; then
            die "PostgreSQL already runs on port $running, not E2E_PG_PORT=$PG_PORT: \`$0 stop\` first"
        fi
        PG_PORT=$running
        say "PostgreSQL already running ($(pg_uri))"
    else
        local explicit=$PG_PORT try log_lines out
        for try in $(seq 1 "$PORT_TRIES"); do
            PG_PORT=${explicit:-$((PORT_MIN + RANDOM % (PORT_MAX - PORT_MIN + 1)))}
            log_lines=$(wc -l <"$dir/postgres.log" 2>/dev/null || echo 0)
            if out=$(as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -o "-p $PG_PORT" -w -t 60 start 2>&1); then
                break
            fi
            # Taken (the server's own bind failed): another port, unless this one was asked for.
            if [ -z "$explicit" ] && tail -n "+$((log_lines + 1))" "$dir/postgres.log" | grep -qi "address already in use"; then
                say "port $PG_PORT is taken; trying another ($try/$PORT_TRIES)"
                [ "$try" -lt "$PORT_TRIES" ] && continue
            fi
            { echo "$out"; tail -n 20 "$dir/postgres.log"; } >&2 || true
            die "PostgreSQL did not start on port $PG_PORT (log $dir/postgres.log)"
        done
        say "PostgreSQL up on $HOST:$PG_PORT (log $dir/postgres.log)"
    fi
    record_port PG_PORT "$PG_PORT"
    local db
    for db in mlflow mlflow_auth optuna; do
        if [ -z "$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
            psql_ -d postgres -c "CREATE DATABASE $db" >/dev/null
        fi
    done
}

mlflow_healthy() {
    [ -n "$MLFLOW_PORT" ] || return 1
    "$VENV/bin/python" - "$(mlflow_uri)/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
# No proxy: a CI's http_proxy must not intercept a loopback address.
urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=2).close()
EOF
}

# The pid in the pid file, if that process is still our MLflow server (not a reused pid).
mlflow_pid() {
    [ -f "$MLFLOW_PID" ] || return 1
    local pid
    pid=$(cat "$MLFLOW_PID")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "mlflow" && echo "$pid"
}

start_mlflow() {
    [ -x "$VENV/bin/mlflow" ] || die "$VENV/bin/mlflow not found: run make install first"
    local explicit=$MLFLOW_PORT try
    if mlflow_pid >/dev/null; then  # ours, started earlier: on the port recorded then
        MLFLOW_PORT=$(recorded_port MLFLOW_PORT)
        if [ -n "$explicit" ] && [ "$explicit" != "$MLFLOW_PORT" ]; then
            die "the MLflow server already runs on port $MLFLOW_PORT, not E2E_MLFLOW_PORT=$explicit: \`$0 stop\` first"
        fi
        local waited=0  # a loaded machine may keep a 2 s /health waiting
        until mlflow_healthy; do
            [ "$waited" -lt 30 ] || die "MLflow server (pid $(cat "$MLFLOW_PID")) runs but does not answer at $(mlflow_uri); see $MLFLOW_LOG, or stop it"
            sleep 1
            waited=$((waited + 1))
        done
        say "MLflow server already answers at $(mlflow_uri)"
        return
    fi
    mkdir -p "$ARTIFACTS"
    write_auth_ini
    for try in $(seq 1 "$PORT_TRIES"); do
        MLFLOW_PORT=${explicit:-$((PORT_MIN + RANDOM % (PORT_MAX - PORT_MIN + 1)))}
        if launch_mlflow; then
            record_port MLFLOW_PORT "$MLFLOW_PORT"
            return
        fi
        # Taken (the server's own bind failed): another port, unless this one was asked for.
        if [ -z "$explicit" ] && grep -aqi "address already in use" "$MLFLOW_LOG"; then
            say "port $MLFLOW_PORT is taken; trying another ($try/$PORT_TRIES)"
            [ "$try" -lt "$PORT_TRIES" ] && continue
        fi
        tail -n 30 "$MLFLOW_LOG" >&2 || true
        die "MLflow server did not come up at $(mlflow_uri) (log $MLFLOW_LOG)"
    done
}

# Start the server on MLFLOW_PORT and wait until it answers; fails (the server stopped) when it
# exits first, e.g. because the port is taken. Only uvicorn's line "Uvicorn running on
# http://HOST:PORT" in our own log says that this server holds the port: until then a /health
# that answers may be another one's.
launch_mlflow() {
    # basic-auth: every request but /health needs a user (HTTP basic auth; the admin from the ini).
    # setsid: the server and its workers form one process group, which stop() ends together.
    # The pid file is written by the group leader itself (exec keeps the pid).
    # +psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed.
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$MLFLOW_PID" \
        env MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI" MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_FLASK_SERVER_SECRET_KEY" \
        PGPASSFILE="$PGPASS" "$VENV/bin/mlflow" server --app-name basic-auth \
        --backend-store-uri "postgresql+psycopg2://$PG_USER@$HOST:$PG_PORT/mlflow" \
        --artifacts-destination "$ARTIFACTS" \
        --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        >"$MLFLOW_LOG" 2>&1 </dev/null &
    local waited=0
    # The first start migrates the database schema: allow a few minutes on a slow machine.
    until grep -aq "Uvicorn running on $(mlflow_uri)" "$MLFLOW_LOG" && mlflow_healthy; do
        if [ "$waited" -ge 300 ] || { [ "$waited" -ge 2 ] && ! mlflow_pid >/dev/null; }; then
            stop_mlflow >/dev/null
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "MLflow server up at $(mlflow_uri) in ${waited}s (pid $(cat "$MLFLOW_PID"), log $MLFLOW_LOG, artifacts $ARTIFACTS)"
}

stop_mlflow() {
    local pid
    if pid=$(mlflow_pid); then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        say "MLflow server stopped"
    fi
    rm -f "$MLFLOW_PID"
}

stop_pg() {
    [ -e "$E2E_DIR/pg" ] || return 0
    local dir
    dir=$(readlink -f "$E2E_DIR/pg")
    if pg_running "$dir"; then
        as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
        say "PostgreSQL stopped"
    fi
}

print_env() {
    echo "export EMBFT_MLFLOW_URI=$(mlflow_uri)"
    echo "export MLFLOW_TRACKING_USERNAME='$E2E_MLFLOW_USER'"
    echo "export MLFLOW_TRACKING_PASSWORD='$E2E_MLFLOW_PASSWORD'"
    echo "export EMBFT_PG_URI=$(pg_uri)"
    echo "export PGPASSFILE=$PGPASS"
}

case "${1:-}" in
    start)
        load_secrets
        start_pg
        start_mlflow
        say "Optuna storage: hydra.sweeper.storage=$(pg_uri)/optuna (password from PGPASSFILE=$PGPASS)"
        say "clients: eval \"\$($0 env)\"  (MLflow user $E2E_MLFLOW_USER; passwords in $SECRETS)"
        ;;
    stop)
        stop_mlflow
        stop_pg
        rm -f "$PORTS"  # the next start chooses again
        ;;
    status)
        up=0
        load_ports
        if [ -e "$E2E_DIR/pg" ] && pg_running "$(readlink -f "$E2E_DIR/pg")"; then
            say "PostgreSQL: running at $(pg_uri) (databases mlflow, optuna)"
        else
            say "PostgreSQL: not running"; up=1
        fi
        if mlflow_pid >/dev/null && mlflow_healthy; then say "MLflow server: up at $(mlflow_uri)"; else say "MLflow server: down"; up=1; fi
        exit $up
        ;;
    env)
        [ -f "$SECRETS" ] || die "no $SECRETS yet: run \`$0 start\` first"
        load_ports
        { [ -n "$PG_PORT" ] && [ -n "$MLFLOW_PORT" ]; } || die "no ports in $PORTS: the services are not running; run \`$0 start\` first"
        load_secrets
        print_env
        ;;
    clean)  # stop, then delete the cluster, the artifacts and the logs
        stop_mlflow
        stop_pg
        if [ -e "$E2E_DIR/pg" ]; then rm -rf "$(readlink -f "$E2E_DIR/pg")"; fi
        rm -rf "$E2E_DIR"
        ;;
    *)
        echo "usage: $0 start|stop|status|env|clean" >&2
        exit 2
        ;;
esac
