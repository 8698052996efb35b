#!/usr/bin/env bash
# A single-node Ray head on 127.0.0.1 for development, with token authentication ON.
#
#   cluster/local-head.sh start     # start the head (in the background), print the addresses
#   cluster/local-head.sh status    # `ray status` + the dashboard's authentication mode
#   cluster/local-head.sh env       # print the client exports: eval "$(cluster/local-head.sh env)"
#   cluster/local-head.sh stop      # stop the head this script started (and only that one)
#
# Settings (environment): NUM_CPUS (8), NUM_GPUS (unset: Ray detects), RAY_HEAD_IP (127.0.0.1),
# RAY_PORT (6379), DASHBOARD_PORT (8265), DASHBOARD_AGENT_PORT (52365), FLUX_RAY_STATE_DIR (<repo>/.flux_ray: pid file and log),
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (use that token instead of ~/.ray/auth_token), STOP_GRACE_S (10:
# seconds `stop` waits for Ray's graceful shutdown before it kills what is left of this head).
#
# Why the script sets RAY_AUTH_MODE=token itself: with Ray 2.60, `ray start --head` turns token
# auth on only when RAY_AUTH_MODE=token or, with RAY_AUTH_MODE unset, when a token already exists;
# otherwise it starts an open cluster with a warning. (`ray.init()` with no address is the path
# that enables it by default and writes ~/.ray/auth_token.) Clients must also run with
# RAY_AUTH_MODE=token or they send no token: see `env` and cluster/README.md.
set -euo pipefail

NUM_CPUS="${NUM_CPUS:-8}"
NUM_GPUS="${NUM_GPUS:-}"
RAY_HEAD_IP="${RAY_HEAD_IP:-127.0.0.1}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
# The dashboard agent's HTTP port (Jobs are submitted through it): Ray's default 52365 is taken when
# another Ray instance runs on this host, and then no job can be submitted ("No available agent").
DASHBOARD_AGENT_PORT="${DASHBOARD_AGENT_PORT:-52365}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${FLUX_RAY_STATE_DIR:-$REPO_ROOT/.flux_ray}"
PID_FILE="$STATE_DIR/local-head.pid"
LOG_FILE="$STATE_DIR/local-head.log"
DASHBOARD_URL="http://$RAY_HEAD_IP:$DASHBOARD_PORT"
GCS_ADDRESS="$RAY_HEAD_IP:$RAY_PORT"

die() { echo "local-head: $*" >&2; exit 1; }

require_token_mode() {
    if [[ -n "${RAY_AUTH_MODE:-}" && "${RAY_AUTH_MODE}" != "token" ]]; then
        die "RAY_AUTH_MODE=$RAY_AUTH_MODE: this script runs the head with token authentication; unset it"
    fi
    export RAY_AUTH_MODE=token
}

token_source() {
    # The order Ray's AuthenticationTokenLoader reads: env var, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        echo "the RAY_AUTH_TOKEN environment variable"
    elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        echo "$RAY_AUTH_TOKEN_PATH (RAY_AUTH_TOKEN_PATH)"
    else
        echo "$HOME/.ray/auth_token"
    fi
}

ensure_token() {
    # Writes ~/.ray/auth_token only when no token is found anywhere (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    # the file). Ray creates it with the umask's mode (often 0644): make a new one private.
    local default_token="$HOME/.ray/auth_token" existed=0
    [[ -e "$default_token" ]] && existed=1
    ray get-auth-token --generate >/dev/null 2>&1 || die "cannot create a token: ray get-auth-token --generate failed"
    if (( ! existed )) && [[ -f "$default_token" ]]; then
        chmod 600 "$default_token"
        echo "local-head: generated a new token in $default_token"
    fi
}

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
    fi
}

head_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

print_env() {
    cat <<EOF
export RAY_AUTH_MODE=token
export RAY_ADDRESS=$GCS_ADDRESS
export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL
EOF
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    fi
}

cmd_start() {
    require_token_mode
    command -v ray >/dev/null 2>&1 || die "ray is not on PATH (activate the venv: . .venv/bin/activate)"
    if pid="$(head_pid)"; then
        echo "local-head: already running (pid $pid); 'cluster/local-head.sh stop' first to restart"
        cmd_info
        return 0
    fi
    ensure_token
    mkdir -p "$STATE_DIR"
    local -a args=(--head --block --node-ip-address "$RAY_HEAD_IP" --port "$RAY_PORT"
        --dashboard-host "$RAY_HEAD_IP" --dashboard-port "$DASHBOARD_PORT"
        --dashboard-agent-listen-port "$DASHBOARD_AGENT_PORT"
        --num-cpus "$NUM_CPUS" --disable-usage-stats)
    [[ -n "$NUM_GPUS" ]] && args+=(--num-gpus "$NUM_GPUS")
    # --block keeps `ray start` in the foreground of this background job; its SIGTERM handler stops
    # every process of this head, so `stop` never touches other Ray clusters on the machine.
    nohup ray start "${args[@]}" >"$LOG_FILE" 2>&1 &
    echo $! >"$PID_FILE"
    local waited=0
    until http_ok "$DASHBOARD_URL/api/gcs_healthz"; do
        if ! head_pid >/dev/null; then
            rm -f "$PID_FILE"
            tail -n 30 "$LOG_FILE" >&2 || true
            die "ray start exited; log: $LOG_FILE"
        fi
        (( waited++ < 120 )) || die "the dashboard did not answer at $DASHBOARD_URL within 60 s; log: $LOG_FILE"
        sleep 0.5
    done
    cmd_info
}

cmd_info() {
    cat <<EOF
Ray head (pid $(cat "$PID_FILE"), log $LOG_FILE)
  GCS address:        $GCS_ADDRESS          ray.init(address="$GCS_ADDRESS")
  Dashboard / jobs:   $DASHBOARD_URL    ray job submit --address $DASHBOARD_URL ...
  Auth:               token; the token is read from $(token_source)
Clients must run with token auth on (RAY_AUTH_MODE=token) and find the same token, in the
order RAY_AUTH_TOKEN (the token itself), RAY_AUTH_TOKEN_PATH (a file), ~/.ray/auth_token:
  eval "\$(cluster/local-head.sh env)"   # RAY_AUTH_MODE, RAY_ADDRESS (drivers), RAY_API_SERVER_ADDRESS (jobs)
  ray job submit --working-dir . -- flux-ray run jobs/<spec>.yaml
The browser dashboard asks for the token once: ray get-auth-token
EOF
}

cmd_status() {
    require_token_mode
    if pid="$(head_pid)"; then
        echo "local-head: running (pid $pid)"
    else
        echo "local-head: no head started by this script (pid file $PID_FILE)"
    fi
    if http_ok "$DASHBOARD_URL/api/gcs_healthz"; then
        local mode=""
        if command -v curl >/dev/null 2>&1; then
            mode="$(curl -fsS --max-time 2 "$DASHBOARD_URL/api/authentication_mode" 2>/dev/null || true)"
        fi
        echo "dashboard: $DASHBOARD_URL is up ${mode:+(authentication: $mode)}"
        ray status --address "$GCS_ADDRESS"
    else
        echo "dashboard: $DASHBOARD_URL does not answer"
        return 1
    fi
}

descendants() {  # every process under pid $1 (ray start -> gcs, raylet, dashboard -> workers)
    local p
    for p in $(pgrep -P "$1" 2>/dev/null); do echo "$p"; descendants "$p"; done
}

cmd_stop() {
    local pid
    if ! pid="$(head_pid)"; then
        rm -f "$PID_FILE"
        echo "local-head: no head started by this script is running" \
             "(to stop every Ray process of this user on the machine: ray stop)"
        return 0
    fi
    local tree
    tree="$(descendants "$pid")"
    kill -TERM "$pid"
    local waited=0
    while kill -0 "$pid" 2>/dev/null && (( waited++ < ${STOP_GRACE_S:-10} * 2 )); do
        sleep 0.5
    done
    # Ray's graceful shutdown can take longer than that after jobs ran; then finish it the way
    # `ray stop --force` would, but only for this head's processes.
    local alive=()
    for p in $pid $tree; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    if (( ${#alive[@]} )); then
        kill -KILL "${alive[@]}" 2>/dev/null || true
        echo "local-head: ${#alive[@]} process(es) still up after ${STOP_GRACE_S:-10} s; killed"
    fi
    rm -f "$PID_FILE"
    echo "local-head: stopped (pid $pid)"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
