#!/usr/bin/env bash
# Local single-node Ray head for development, reachable from this machine only.
#
#   infra/local_head.sh [start]   start a head in the background, wait until its job API answers,
#                                 print the RAY_ADDRESS export line and a `ray job submit` example
#   infra/local_head.sh status    say whether this head runs (exit 0) or not (exit 3)
#   infra/local_head.sh stop      stop THIS head only (see "Stopping" below); no-op if it is not running
#
# Run it with `ray` on PATH (e.g. `source .venv/bin/activate`). Linux only (uses setsid and ps).
#
# Settings (environment variables; start, status and stop must see the same RAY_PORT or RAY_LOCAL_DIR):
#   RAY_PORT=6379                GCS port; also names the state dir
#   DASHBOARD_PORT=8265          dashboard / job API port
#   RAY_NUM_CPUS=$(nproc)        CPUs the head advertises;  RAY_NUM_GPUS  GPUs (default: Ray autodetects)
#   RAY_LOCAL_DIR=/tmp/ray-local-$RAY_PORT
#                                state dir: Ray's --temp-dir (sessions, logs, sockets) plus head.pid,
#                                head.log and head.env. At most 40 characters: Ray puts Unix sockets
#                                under it and socket paths are limited to 107 bytes.
#   RAY_CLIENT_SERVER_PORT, DASHBOARD_AGENT_LISTEN_PORT, DASHBOARD_AGENT_GRPC_PORT,
#   RUNTIME_ENV_AGENT_PORT, METRICS_EXPORT_PORT, NODE_MANAGER_PORT, OBJECT_MANAGER_PORT
#                                passed to `ray start` when set. Ray's defaults for the first two are
#                                fixed (10001, 52365), as are AUTOSCALER_METRIC_PORT (44217) and
#                                DASHBOARD_METRIC_PORT (44227), which Ray reads from the environment
#                                itself: set all four to run next to another Ray instance.
#   RAY_AUTH_MODE=token          Ray token authentication (the default here, as for `ray.init()`).
#                                The token comes from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
#                                else ~/.ray/auth_token; a missing file is created (never printed).
#                                RAY_AUTH_MODE=disabled turns it off.
#   RAY_START_TIMEOUT=120, RAY_STOP_TIMEOUT=60   bounds, in seconds, on waiting for start / stop
#   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=5      how long the head drains on stop (Ray's own default: 30)
#
# Loopback only: on Linux Ray ignores `--node-ip-address=127.0.0.1` (it swaps loopback for the
# machine's address) and its GCS, raylet and agents then listen on all interfaces. Ray's single-node
# switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what Ray does by default on macOS and Windows) keeps
# the node address at 127.0.0.1, and then every listener binds 127.0.0.1; together with
# --dashboard-host=127.0.0.1 nothing of this head is reachable from another machine, and no other
# machine can join it. Jobs (`ray job submit`) need nothing more; a driver that connects directly
# with ray.init() needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in its environment too (start prints how).
#
# Stopping: `ray stop` is NOT used. It kills every Ray process on the machine, matched by process
# name (raylet, gcs_server, ray::*, dashboard.py, ...), including other users' heads and the local
# clusters that test suites start with ray.init(). Instead the head runs as `ray start --head --block`
# in a session of its own (setsid), so every process it spawns shares its session id. `stop` sends
# SIGTERM to that `ray start` process, which drains and shuts down exactly the processes it started
# (Ray's own shutdown path), then sweeps what is left in that session or names this state dir,
# with SIGTERM and, after a bounded wait, SIGKILL. Nothing outside the head is touched.
set -euo pipefail

die() { echo "local_head.sh: $*" >&2; exit 1; }

CMD="${1:-start}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
STATE_DIR="${RAY_LOCAL_DIR:-/tmp/ray-local-${RAY_PORT}}"
START_TIMEOUT="${RAY_START_TIMEOUT:-120}"
STOP_TIMEOUT="${RAY_STOP_TIMEOUT:-60}"
PIDFILE="$STATE_DIR/head.pid"
LOGFILE="$STATE_DIR/head.log"
ENVFILE="$STATE_DIR/head.env"

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
for v in RAY_PORT DASHBOARD_PORT START_TIMEOUT STOP_TIMEOUT; do
    is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
[[ "$STATE_DIR" == /* ]] || die "RAY_LOCAL_DIR must be an absolute path, got '$STATE_DIR'"
STATE_DIR="${STATE_DIR%/}"
[[ ${#STATE_DIR} -le 40 ]] || die "RAY_LOCAL_DIR '$STATE_DIR' is longer than 40 characters (Ray's socket paths would exceed 107 bytes)"

# PID of the `ray start --head --block` process of this state dir, if it runs: it is the leader of
# its own session and its command line names this state dir.
leader_pid() {
    local pid=""
    if [[ -f "$PIDFILE" ]]; then
        pid="$(tr -dc '0-9' <"$PIDFILE")"
    fi
    if [[ -n "$pid" ]] && is_leader "$pid"; then
        echo "$pid"
        return 0
    fi
    # Pidfile missing or stale: look for it by its command line.
    # (Values go to awk through the environment: an awk whose argv named the state dir would match itself.)
    ps -eo pid=,sid=,args= | LH_ARG="--temp-dir=$STATE_DIR" awk '
        BEGIN { dir = ENVIRON["LH_ARG"] }
        $1 == $2 && index($0, " start --head ") && (index($0, dir " ") || substr($0, length($0) - length(dir) + 1) == dir) { print $1; exit }'
}

is_leader() {
    local args sid
    args="$(ps -o args= -p "$1" 2>/dev/null)" || return 1
    sid="$(ps -o sid= -p "$1" 2>/dev/null | tr -d ' ')" || return 1
    [[ "$sid" == "$1" && "$args" == *" start --head "* && ( "$args" == *"--temp-dir=$STATE_DIR "* || "$args" == *"--temp-dir=$STATE_DIR" ) ]]
}

# This script and its ancestors (a caller's command line may well name the state dir).
ancestors() {
    local p=$$ out=""
    while [[ -n "$p" && "$p" -gt 1 ]]; do
        out+=" $p"
        p="$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')"
    done
    echo "$out "
}

# Live (non-zombie) processes of this head, never this script or its ancestors: members of session
# $1 (all of them when $2 is "all", else only those whose command line mentions ray) and any
# process whose command line names this state dir.
head_processes() {
    local sid="${1:-}" mode="${2:-ray}"
    ps -eo pid=,sid=,stat=,args= | LH_SID="$sid" LH_MODE="$mode" LH_DIR="$STATE_DIR" LH_SKIP="$(ancestors)" awk '
        BEGIN { sid = ENVIRON["LH_SID"]; mode = ENVIRON["LH_MODE"]; dir = ENVIRON["LH_DIR"]
                skip = ENVIRON["LH_SKIP"] }
        {
            if (index(skip, " " $1 " ") || $3 ~ /^Z/) next
            args = $0
            sub(/^[ \t]*[0-9]+[ \t]+[0-9]+[ \t]+[^ \t]+[ \t]+/, "", args)
            mine = (sid != "" && $2 == sid && (mode == "all" || args ~ /ray/))
            # the state dir as a whole path: followed by "/", a space or the end
            s = args
            while (!mine && (i = index(s, dir)) > 0) {
                c = substr(s, i + length(dir), 1)
                if (c == "" || c == "/" || c == " ") mine = 1
                s = substr(s, i + length(dir))
            }
            if (mine) print $1
        }'
}

port_in_use() {  # something accepts connections on 127.0.0.1:$1
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

token_available() {
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "$RAY_AUTH_TOKEN_PATH" ]]
        return
    fi
    [[ -s "$HOME/.ray/auth_token" ]]
}

# The interpreter that runs `ray` (for the stdlib-only readiness probe); python3 as a fallback.
ray_python() {
    local shebang
    shebang="$(head -n 1 "$(command -v ray)" 2>/dev/null || true)"
    if [[ "$shebang" =~ ^#!(/[^[:space:]]*python[0-9.]*)$ && -x "${BASH_REMATCH[1]}" ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        command -v python3 || die "python3 not found"
    fi
}

# Exit 0 once the dashboard on DASHBOARD_PORT belongs to this head (its session name is the one in
# this state dir) and its job API lists jobs; 1 while not yet; 2 if the port serves another Ray.
probe() {
    "$PY" - "$DASHBOARD_PORT" "$STATE_DIR" "$AUTH_MODE" <<'EOF'
import json, os, sys, urllib.error, urllib.request
port, state_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
headers = {}
if mode == "token":
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        with open(path) as f:
            token = f.read().strip()
    headers["Authorization"] = "Bearer " + token
try:
    session = os.path.basename(os.readlink(os.path.join(state_dir, "session_latest")))
    def get(path):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    status, body = get("/api/version")
    if json.loads(body).get("session_name") != session:
        sys.exit(2)
    status, _ = get("/api/jobs/")
    sys.exit(0 if status == 200 else 1)
except (OSError, ValueError, urllib.error.URLError):
    sys.exit(1)
EOF
}

stop_head() {
    local pid sid="" mode=ray deadline pids found=""
    pid="$(leader_pid || true)"
    if [[ -n "$pid" ]]; then
        # The leader is alive, so its session holds only this head's processes.
        sid="$pid" mode=all
        echo "Stopping the Ray head in $STATE_DIR (pid $pid)..."
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "The head did not stop within ${STOP_TIMEOUT}s; killing it." >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    elif [[ -f "$PIDFILE" ]]; then
        # The leader died earlier (e.g. SIGKILL): its recorded pid still names the session of any
        # leftovers (the kernel does not reuse a pid that is some process's session id); take
        # only processes that look like Ray there.
        sid="$(tr -dc '0-9' <"$PIDFILE")"
    fi
    # Leftovers: what Ray's own shutdown missed, within this head's session or naming its state dir.
    pids="$(head_processes "$sid" "$mode")"
    if [[ -n "$pid$pids" ]]; then found=1; fi
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while [[ -n "$(head_processes "$sid" "$mode")" ]] && ((SECONDS < deadline)); do sleep 0.25; done
        pids="$(head_processes "$sid" "$mode")"
        # shellcheck disable=SC2086
        [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    if [[ -n "$found" ]]; then
        echo "Stopped the Ray head in $STATE_DIR."
    else
        echo "No Ray head is running in $STATE_DIR."
    fi
}

case "$CMD" in
stop)
    stop_head
    ;;
status)
    pid="$(leader_pid || true)"
    if [[ -n "$pid" ]]; then
        dash="$DASHBOARD_PORT"
        [[ -f "$ENVFILE" ]] && dash="$(sed -n 's/^DASHBOARD_PORT=//p' "$ENVFILE")"
        echo "Ray head running in $STATE_DIR (pid $pid), job API at http://127.0.0.1:$dash"
    else
        echo "No Ray head is running in $STATE_DIR."
        exit 3
    fi
    ;;
start)
    command -v ray >/dev/null || die "ray is not on PATH (activate the virtualenv: source .venv/bin/activate)"
    command -v setsid >/dev/null || die "setsid (util-linux) is required"
    NUM_CPUS="${RAY_NUM_CPUS:-$(nproc 2>/dev/null || echo 1)}"
    is_uint "$NUM_CPUS" || die "RAY_NUM_CPUS must be a non-negative integer, got '$NUM_CPUS'"
    AUTH_MODE="${RAY_AUTH_MODE:-token}"
    [[ "$AUTH_MODE" == token || "$AUTH_MODE" == disabled ]] || die "RAY_AUTH_MODE must be 'token' or 'disabled', got '$AUTH_MODE'"
    PY="$(ray_python)"

    # State dir: reused only if it is a real directory of ours (not a symlink someone else planted
    # in /tmp). Ray itself then makes it world-writable, as it does with its default /tmp/ray.
    if [[ -e "$STATE_DIR" || -L "$STATE_DIR" ]]; then
        [[ -d "$STATE_DIR" && ! -L "$STATE_DIR" && -O "$STATE_DIR" ]] \
            || die "$STATE_DIR exists but is not a directory owned by $(id -un)"
    else
        mkdir -p "$(dirname "$STATE_DIR")"
        mkdir -m 700 "$STATE_DIR"
    fi
    if pid="$(leader_pid)" && [[ -n "$pid" ]]; then
        die "a Ray head already runs in $STATE_DIR (pid $pid); run '$0 stop' first"
    fi

    args=(--head --block
          --node-ip-address=127.0.0.1 --port="$RAY_PORT"
          --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
          --num-cpus="$NUM_CPUS" --disable-usage-stats
          --temp-dir="$STATE_DIR")
    ports=("$RAY_PORT" "$DASHBOARD_PORT")
    if [[ -n "${RAY_NUM_GPUS:-}" ]]; then
        is_uint "$RAY_NUM_GPUS" || die "RAY_NUM_GPUS must be a non-negative integer"
        args+=(--num-gpus="$RAY_NUM_GPUS")
    fi
    for pair in RAY_CLIENT_SERVER_PORT:ray-client-server-port \
                DASHBOARD_AGENT_LISTEN_PORT:dashboard-agent-listen-port \
                DASHBOARD_AGENT_GRPC_PORT:dashboard-agent-grpc-port \
                RUNTIME_ENV_AGENT_PORT:runtime-env-agent-port \
                METRICS_EXPORT_PORT:metrics-export-port \
                NODE_MANAGER_PORT:node-manager-port \
                OBJECT_MANAGER_PORT:object-manager-port; do
        var="${pair%%:*}"
        if [[ -n "${!var:-}" ]]; then
            is_uint "${!var}" || die "$var must be a non-negative integer, got '${!var}'"
            args+=(--"${pair#*:}=${!var}")
            [[ "${!var}" == 0 ]] || ports+=("${!var}")
        fi
    done
    for p in "${ports[@]}"; do
        ! port_in_use "$p" || die "port $p on 127.0.0.1 is already in use (set RAY_PORT / DASHBOARD_PORT / ... to free ports)"
    done

    if [[ "$AUTH_MODE" == token ]] && ! token_available; then
        if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
            (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$RAY_AUTH_TOKEN_PATH")
        else
            ray get-auth-token --generate >/dev/null  # writes ~/.ray/auth_token; the token is not printed
        fi
        echo "Created a Ray auth token at ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}."
    fi

    rm -f "$PIDFILE"
    (
        cd "$STATE_DIR"
        export RAY_AUTH_MODE="$AUTH_MODE"
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
        export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
        export RAY_USAGE_STATS_ENABLED=0
        exec setsid ray start "${args[@]}" </dev/null >"$LOGFILE" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$PIDFILE"
    printf 'RAY_PORT=%s\nDASHBOARD_PORT=%s\nRAY_AUTH_MODE=%s\n' "$RAY_PORT" "$DASHBOARD_PORT" "$AUTH_MODE" >"$ENVFILE"

    # Interrupted while waiting: do not leave a half-started head behind.
    trap 'stop_head >/dev/null; exit 130' INT TERM HUP
    echo "Starting a Ray head in $STATE_DIR (pid $pid, log $LOGFILE)..."
    deadline=$((SECONDS + START_TIMEOUT))
    ready=0
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOGFILE" >&2 || true
            stop_head >/dev/null
            die "ray start exited; see $LOGFILE"
        fi
        rc=1
        if [[ -L "$STATE_DIR/session_latest" ]]; then
            probe && rc=0 || rc=$?
        fi
        if ((rc == 0)); then ready=1; break; fi
        if ((rc == 2)); then
            stop_head >/dev/null
            die "port $DASHBOARD_PORT answers for another Ray session"
        fi
        sleep 1
    done
    if ((ready == 0)); then
        tail -n 30 "$LOGFILE" >&2 || true
        stop_head >/dev/null
        die "the head's job API did not answer within ${START_TIMEOUT}s; see $LOGFILE"
    fi
    trap - INT TERM HUP
    [[ "$(ps -o sid= -p "$pid" | tr -d ' ')" == "$pid" ]] || echo "warning: pid $pid is not a session leader; stop may miss processes" >&2

    address="http://127.0.0.1:$DASHBOARD_PORT"
    echo "Ray head is up: job API and dashboard at $address (loopback only)."
    echo
    echo "export RAY_ADDRESS=$address"
    if [[ "$AUTH_MODE" == token ]]; then
        echo "export RAY_AUTH_MODE=token"
        [[ -z "${RAY_AUTH_TOKEN_PATH:-}" ]] || echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    fi
    echo
    echo "Submit a job (from the repository root):"
    echo "  ray job submit --address $address --working-dir . -- \\"
    echo "      python jobs/batch.py --scripts s3://bucket/scripts.jsonl --output s3://bucket/runs/dev/ --preset tiny"
    echo "  (with no flags batch.py renders its sample scripts with the tiny preset; give --output as an"
    echo "  absolute path or URL, the job runs in a copy of the working directory)"
    echo "A driver run directly (ray.init, not a job) needs the GCS address and the loopback switch:"
    echo "  RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python jobs/batch.py ..."
    echo "Stop it:"
    echo "  RAY_LOCAL_DIR=$STATE_DIR $0 stop"
    ;;
*)
    echo "usage: $0 [start|status|stop]" >&2
    exit 2
    ;;
esac
