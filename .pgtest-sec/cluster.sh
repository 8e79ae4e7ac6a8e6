# Throwaway PostgreSQL clusters for the demo, the end-to-end tests and the benchmark.
# Source it, then: cluster_start DIR PORT [postgresql.conf lines...]; cluster_psql ...
# The cluster is stopped when the sourcing script exits. Servers run as the postgres user
# (Postgres refuses root) and listen only on a Unix socket inside DIR.

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

cluster_start() {
    CLUSTER_DIR=$1 CLUSTER_PORT=$2
    shift 2
    cluster_stop "$CLUSTER_DIR"
    rm -rf "$CLUSTER_DIR"
    mkdir -p "$CLUSTER_DIR"
    chown postgres "$CLUSTER_DIR"
    sudo -u postgres "$PG_BIN/initdb" -D "$CLUSTER_DIR/data" -A trust -U postgres >/dev/null
    {
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$CLUSTER_DIR'"
        echo "port = $CLUSTER_PORT"
        printf '%s\n' "$@"
    } >>"$CLUSTER_DIR/data/postgresql.conf"
    sudo -u postgres "$PG_BIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" -w start >/dev/null
    trap 'cluster_stop "$CLUSTER_DIR"' EXIT
}

cluster_stop() {
    if [ -f "$1/data/postmaster.pid" ]; then
        sudo -u postgres "$PG_BIN/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

# psql against the current cluster: stops at the first error, prints bare values.
cluster_psql() {
    psql -h "$CLUSTER_DIR" -p "$CLUSTER_PORT" -U "${CLUSTER_USER:-postgres}" -d "${CLUSTER_DB:-postgres}" -X -q -v ON_ERROR_STOP=1 "$@"
}
