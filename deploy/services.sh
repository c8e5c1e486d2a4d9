#!/usr/bin/env bash
# The services a team shares, started on one host: PostgreSQL (tracking and model registry),
# S3-compatible object storage (model artifacts) and the MLflow tracking server in front of both;
# optionally a Spark standalone master and workers, to try the cluster path before using a real one.
#
#   deploy/services.sh start                 # postgres, s3, mlflow
#   deploy/services.sh start spark           # one service: postgres | s3 | mlflow | spark
#   deploy/services.sh stop                  # every service started from this state folder
#   deploy/services.sh stop s3               # one service
#   . "$MLFLOW_TEAM_DIR/client.env"          # the variables builds, serving and Spark drivers need
#
# Settings, from the environment [default]:
#   MLFLOW_TEAM_DIR [./mlflow-team]  state: pgdata/, logs/, pids/, client.env
#   TEAM_HOST [127.0.0.1]            address every service binds to
#   PG_BIN [/usr/lib/postgresql/15/bin], PG_PORT [5432], PG_USER [mlflow], PG_PASSWORD [mlflow], PG_DB [mlflow]
#   S3_ENDPOINT []                   an existing S3-compatible endpoint (MinIO, AWS: https://s3.REGION.amazonaws.com);
#                                    empty: start the moto_server S3 emulator on S3_PORT [9000] with bucket S3_BUCKET
#   S3_BUCKET [mlflow], AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [testing, for the emulator]
#   MLFLOW_PORT [5000], MLFLOW_WORKERS [2]
#   SPARK_PORT [7077], SPARK_WORKERS [2], SPARK_WORKER_CORES [1], SPARK_WORKER_MEMORY [2g]
# Needs: PostgreSQL's server binaries, and on PATH `mlflow` with psycopg2 and boto3 (and `moto_server`,
# pyspark and Java 17 for the emulator and Spark): pip install -e '.[dev,spark]'.
set -euo pipefail

TEAM_DIR=$(realpath -m "${MLFLOW_TEAM_DIR:-./mlflow-team}")
HOST=${TEAM_HOST:-127.0.0.1}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_PORT=${PG_PORT:-5432} PG_USER=${PG_USER:-mlflow} PG_PASSWORD=${PG_PASSWORD:-mlflow} PG_DB=${PG_DB:-mlflow}
S3_ENDPOINT=${S3_ENDPOINT:-} S3_PORT=${S3_PORT:-9000} S3_BUCKET=${S3_BUCKET:-mlflow}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
MLFLOW_PORT=${MLFLOW_PORT:-5000} MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
SPARK_PORT=${SPARK_PORT:-7077} SPARK_WORKERS=${SPARK_WORKERS:-2}
SPARK_WORKER_CORES=${SPARK_WORKER_CORES:-1} SPARK_WORKER_MEMORY=${SPARK_WORKER_MEMORY:-2g}
LOGS=$TEAM_DIR/logs PIDS=$TEAM_DIR/pids

fail() { echo "services.sh: $*" >&2; exit 1; }

need() { command -v "$1" >/dev/null || fail "$1 not found on PATH: $2"; }

# PostgreSQL refuses to run as root: as root, its commands run as the `postgres` system user.
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Each service is the leader of its own process group, so stopping it also stops its children
# (the MLflow server's workers, a Spark worker's executors).
launch() {
    local name=$1; shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

stop_pid() {
    local file=$PIDS/$1.pid pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$file"
}

wait_for() {  # wait_for NAME SECONDS COMMAND...: until COMMAND succeeds, or fail with the log's tail
    local name=$1 seconds=$2 pid; shift 2
    pid=$(cat "$PIDS/$name.pid" 2>/dev/null || true)
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then break; fi  # it exited: no use waiting
        sleep 0.2
    done
    tail -n 20 "$LOGS/$name.log" >&2 || true
    fail "$name did not come up within ${seconds}s (log: $LOGS/$name.log)"
}

s3_endpoint() { echo "${S3_ENDPOINT:-http://$HOST:$S3_PORT}"; }

start_postgres() {
    local data=$TEAM_DIR/pgdata
    [ -x "$PG_BIN/initdb" ] || fail "PostgreSQL server binaries not found in $PG_BIN (set PG_BIN)."
    if [ ! -f "$data/PG_VERSION" ]; then
        mkdir -p "$data" && chmod 700 "$data"
        [ "$(id -u)" = 0 ] && chown postgres: "$data"
        as_postgres test -w "$data" || fail "user postgres cannot write $data: make $TEAM_DIR and its parents traversable."
        printf '%s\n' "$PG_PASSWORD" >"$data/../.pwfile"
        [ "$(id -u)" = 0 ] && chown postgres: "$data/../.pwfile"
        as_postgres "$PG_BIN/initdb" -D "$data" -U "$PG_USER" --pwfile="$data/../.pwfile" \
            --auth=scram-sha-256 -E UTF8 >"$LOGS/initdb.log" 2>&1 || { rm -f "$data/../.pwfile"; fail "initdb failed: $LOGS/initdb.log"; }
        rm -f "$data/../.pwfile"
    fi
    [ "$(id -u)" = 0 ] && touch "$LOGS/postgres.log" && chown postgres: "$LOGS/postgres.log"
    as_postgres "$PG_BIN/pg_ctl" -D "$data" -l "$LOGS/postgres.log" -w -t 60 \
        -o "-c listen_addresses=$HOST -p $PG_PORT -k $data" start >/dev/null
    export PGPASSWORD=$PG_PASSWORD
    "$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1 \
        || "$PG_BIN/createdb" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" "$PG_DB"
}

stop_postgres() {
    local data=$TEAM_DIR/pgdata
    [ -f "$data/postmaster.pid" ] || return 0
    as_postgres "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
}

start_s3() {
    [ -n "$S3_ENDPOINT" ] && return 0  # an existing store: its bucket is the owner's to create
    need moto_server "pip install 'moto[server]'"
    launch s3 moto_server -H "$HOST" -p "$S3_PORT"
    wait_for s3 30 curl -sf "http://$HOST:$S3_PORT/"
    python -c "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])" \
        "$(s3_endpoint)" "$S3_BUCKET"
}

start_mlflow() {
    need mlflow "pip install -e '.[dev]' (mlflow with psycopg2-binary and boto3)"
    # The server alone talks to PostgreSQL and to the bucket; clients upload and download artifacts
    # through it (mlflow-artifacts:/), so they need only MLFLOW_TRACKING_URI.
    MLFLOW_S3_ENDPOINT_URL=$(s3_endpoint) launch mlflow mlflow server --host "$HOST" --port "$MLFLOW_PORT" \
        --workers "$MLFLOW_WORKERS" \
        --backend-store-uri "postgresql://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/$PG_DB" \
        --artifacts-destination "s3://$S3_BUCKET/artifacts"
    wait_for mlflow 180 curl -sf "http://$HOST:$MLFLOW_PORT/health"
    client_env mlflow "export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"
}

start_spark() {
    need java "Spark needs Java 17"
    local i work registered
    SPARK_HOME=$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))') \
        || fail "pyspark is not installed: pip install -e '.[spark]'"
    export SPARK_HOME SPARK_LOCAL_IP=$HOST
    launch spark-master "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
        --host "$HOST" --port "$SPARK_PORT" --webui-port 0
    for i in $(seq "$SPARK_WORKERS"); do
        work=$TEAM_DIR/spark-worker-$i && mkdir -p "$work"
        launch "spark-worker-$i" "$SPARK_HOME/bin/spark-class" \
            org.apache.spark.deploy.worker.Worker --host "$HOST" --cores "$SPARK_WORKER_CORES" \
            --memory "$SPARK_WORKER_MEMORY" --work-dir "$work" --webui-port 0 "spark://$HOST:$SPARK_PORT"
    done
    registered() { [ "$(grep -c 'Registering worker' "$LOGS/spark-master.log")" -ge "$SPARK_WORKERS" ]; }
    wait_for spark-master 120 registered
    client_env spark "export SPARK_MASTER_URL=spark://$HOST:$SPARK_PORT" \
        "export SPARK_LOCAL_IP=$HOST  # the address Spark executors reach the driver at"
}

stop_spark() {
    local file
    for file in "$PIDS"/spark-worker-*.pid; do [ -f "$file" ] && stop_pid "$(basename "$file" .pid)"; done
    stop_pid spark-master
    client_env spark
}

# client.env gathers what each running service tells its clients (env.d/SERVICE.env).
client_env() {
    local service=$1; shift
    mkdir -p "$TEAM_DIR/env.d"
    (
        flock 9  # two services started at once each rewrite client.env
        if [ $# -gt 0 ]; then printf '%s\n' "$@" >"$TEAM_DIR/env.d/$service.env"; else rm -f "$TEAM_DIR/env.d/$service.env"; fi
        { echo "# Source this before a build, evaluate, promote, serve or a Spark driver."; cat "$TEAM_DIR"/env.d/*.env 2>/dev/null || true; } \
            >"$TEAM_DIR/client.env"
    ) 9>"$TEAM_DIR/.lock"
}

main() {
    local action=${1:-} services
    shift || true
    mkdir -p "$LOGS" "$PIDS"
    [ "$(id -u)" = 0 ] && chmod 755 "$TEAM_DIR"
    case $action in
        start)
            services=("${@:-postgres s3 mlflow}")
            for service in ${services[*]}; do
                case $service in
                    postgres|s3|mlflow|spark) "start_$service" ;;
                    *) fail "unknown service $service (postgres | s3 | mlflow | spark)" ;;
                esac
                echo "started $service"
            done
            echo "client settings: $TEAM_DIR/client.env" ;;
        stop)
            services=("${@:-spark mlflow s3 postgres}")
            local pids=() pid status=0
            for service in ${services[*]}; do  # side by side: each waits for its processes to exit
                case $service in
                    postgres) stop_postgres & ;;
                    spark) stop_spark & ;;
                    s3) stop_pid s3 & ;;
                    mlflow) { stop_pid mlflow && client_env mlflow; } & ;;
                    *) fail "unknown service $service (postgres | s3 | mlflow | spark)" ;;
                esac
                pids+=($!)
            done
            for pid in "${pids[@]}"; do wait "$pid" || status=1; done
            return $status ;;
        *) fail "usage: services.sh start|stop [postgres|s3|mlflow|spark ...]" ;;
    esac
}

main "$@"
