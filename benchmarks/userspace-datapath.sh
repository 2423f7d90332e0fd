#!/usr/bin/env bash
# Data-path benchmark: requests per second and p99 latency of the same HTTP traffic sent
#   - directly to a backend pod,
#   - through a ClusterIP in sluice's iptables mode (kernel DNAT),
#   - through the same ClusterIP in sluice's userspace mode (REDIRECT to the relay),
#   - through haproxy in TCP mode (Debian's package) in the node namespace,
# side by side in one run, in throw-away network namespaces on this host. Each path is
# measured twice: with keep-alive connections (bytes relayed over established
# connections) and with a new connection per request (accept + backend connect per request).
#
#   sudo benchmarks/userspace-datapath.sh [-d SECONDS] [-c CONNECTIONS] [-t THREADS] [-r ROUNDS]
#
# The paths are measured in turn, ROUNDS times over (default 3, 5 s each), and the table
# gives each path's median over the rounds: on a shared machine a burst of other work then
# costs one round of one path, not a whole path.
#
# SLUICE_BIN defaults to .build/release/sluice, built (`swift build -c release --product
# sluice`) when missing: a debug build's relay is several times slower. Needs root,
# iproute2, iptables, and wrk, nginx-light and haproxy from Debian (installed with apt-get
# when missing). Writes benchmarks/results/userspace-datapath-<UTC time>.md and .csv.
#
# Network (same plan as the kernel tests): client pod 10.244.1.10 behind the node's
# 10.244.1.1; backend pods 10.244.2.10 and 10.244.3.10 run nginx on :8080 and up (a
# 10-byte body, keep-alive); Service 10.96.0.10:80 -> the backends; haproxy listens on
# 10.244.1.1:9080 and up with both backends as servers (round robin). wrk runs in the
# client pod. Each path and round uses its own backend port (see `port`).
# Everything (namespaces, processes, files) is removed on exit, also when interrupted.

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

DURATION=5
CONNECTIONS=32
THREADS=2
ROUNDS=3
while getopts "d:c:t:r:h" opt; do
    case $opt in
        d) DURATION=$OPTARG ;;
        c) CONNECTIONS=$OPTARG ;;
        t) THREADS=$OPTARG ;;
        r) ROUNDS=$OPTARG ;;
        *) sed -n '2,27p' "$0"; exit 2 ;;
    esac
done

[[ $(id -u) == 0 ]] || { echo "userspace-datapath: needs root (network namespaces, iptables)" >&2; exit 1; }

SLUICE_BIN=${SLUICE_BIN:-.build/release/sluice}
if [[ ! -x $SLUICE_BIN ]]; then
    echo "== building $SLUICE_BIN (swift build -c release --product sluice)"
    swift build -c release --product sluice
fi
SLUICE_BIN=$(cd "$(dirname "$SLUICE_BIN")" && pwd)/$(basename "$SLUICE_BIN")

missing=()
for tool in wrk:wrk nginx:nginx-light haproxy:haproxy ip:iproute2 iptables:iptables; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

P="ubd$$"
NS_NODE="$P-node" NS_CLI="$P-cli" NS_BE1="$P-be1" NS_BE2="$P-be2"
CLUSTER_IP=10.96.0.10
NODE_ADDR=10.244.1.1
# Each path, in each round, reaches the backends (and haproxy its frontend) on ports of its
# own: with a connection per request, a measurement would otherwise meet the TIME_WAIT
# sockets the ones before it left on the same 4-tuples and pay for them.
PATHS=(direct iptables userspace haproxy)
# port BASE PATH ROUND: BASE + 4 * (ROUND - 1) + the path's index.
port() {
    local i
    for i in "${!PATHS[@]}"; do [[ ${PATHS[$i]} == "$2" ]] && break; done
    echo $(($1 + 4 * ($3 - 1) + i))
}
((ROUNDS >= 1 && ROUNDS <= 10)) || { echo "-r wants 1-10 rounds" >&2; exit 2; }

PIDS=()
NAMESPACES=()
TMP=$(mktemp -d /tmp/userspace-datapath.XXXXXX)
CLEANED=0
cleanup() {
    [[ $CLEANED == 1 ]] && return 0
    CLEANED=1
    set +e
    trap '' INT TERM
    local pid ns
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    sleep 0.5
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$TMP"
    return 0
}
trap cleanup EXIT
trap 'echo "interrupted, cleaning up" >&2; cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
add_ns() {
    [[ -e /run/netns/$1 ]] && { echo "namespace $1 exists" >&2; exit 1; }
    NAMESPACES+=("$1")
    ip netns add "$1"
}

# --- network -------------------------------------------------------------------------
for ns in "$NS_NODE" "$NS_CLI" "$NS_BE1" "$NS_BE2"; do add_ns "$ns"; done
in_ns "$NS_NODE" sysctl -q -w net.ipv4.ip_forward=1
ip -n "$NS_NODE" link set lo up
ip -n "$NS_NODE" link add vcli type veth peer name eth0 netns "$NS_CLI"
ip -n "$NS_NODE" addr add $NODE_ADDR/24 dev vcli
ip -n "$NS_NODE" link set vcli up
for i in 1 2; do
    ns_var="NS_BE$i"
    ip -n "$NS_NODE" link add "vbe$i" type veth peer name eth0 netns "${!ns_var}"
    ip -n "$NS_NODE" addr add "10.244.$((i + 1)).1/24" dev "vbe$i"
    ip -n "$NS_NODE" link set "vbe$i" up
done
setup_pod() {
    local ns=$1 addr=$2 gw=$3
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add 10.244.0.0/16 via "$gw"
    ip -n "$ns" route add 10.96.0.0/12 via "$gw"
}
setup_pod "$NS_CLI" 10.244.1.10 $NODE_ADDR
setup_pod "$NS_BE1" 10.244.2.10 10.244.2.1
setup_pod "$NS_BE2" 10.244.3.10 10.244.3.1

# --- backends: nginx ------------------------------------------------------------------
for i in 1 2; do
    ns_var="NS_BE$i"
    mkdir -p "$TMP/nginx$i"
    cat >"$TMP/nginx$i/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx$i/nginx.pid;
error_log $TMP/nginx$i/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $TMP/nginx$i/body;
    server {
$(for p in $(seq 8080 $((8080 + 4 * ROUNDS - 1))); do echo "        listen 10.244.$((i + 1)).10:$p backlog=4096;"; done)
        location / { return 200 "backend-$i\n"; }
    }
}
EOF
    in_ns "${!ns_var}" nginx -p "$TMP/nginx$i" -c "$TMP/nginx$i/nginx.conf" -e "$TMP/nginx$i/error.log" &
    PIDS+=($!)
done

# --- haproxy (TCP mode) in the node namespace ---------------------------------------------
cat >"$TMP/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
EOF
for round in $(seq "$ROUNDS"); do
    backend_port=$(port 8080 haproxy "$round")
    cat >>"$TMP/haproxy.cfg" <<EOF
frontend relay$round
    bind $NODE_ADDR:$(port 9080 haproxy "$round")
    default_backend pods$round
backend pods$round
    balance roundrobin
    server be1 10.244.2.10:$backend_port
    server be2 10.244.3.10:$backend_port
EOF
done
in_ns "$NS_NODE" haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
PIDS+=($!)

# --- the Service (its target port depends on the mode measured) ----------------------------
mkdir -p "$TMP/manifests"
write_service() {
    local port=$1
    cat >"$TMP/manifests/.web.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: bench}
spec:
  clusterIP: $CLUSTER_IP
  ports: [{name: http, protocol: TCP, port: 80, targetPort: $port}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: bench, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: $port, protocol: TCP}]
endpoints:
- addresses: [10.244.2.10]
  conditions: {ready: true}
- addresses: [10.244.3.10]
  conditions: {ready: true}
EOF
    mv "$TMP/manifests/.web.yaml" "$TMP/manifests/web.yaml"
}

# wait_http URL: until one request through URL is answered (10 s).
wait_http() {
    local url=$1
    for _ in $(seq 100); do
        if in_ns "$NS_CLI" /usr/bin/python3 - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1).read()
PY
        sleep 0.1
    done
    echo "no answer from $url" >&2
    return 1
}

SLUICE_PID=""
start_sluice() {
    local mode=$1 port=$2
    write_service "$port"
    in_ns "$NS_NODE" "$SLUICE_BIN" --proxy-mode "$mode" --manifests "$TMP/manifests" --hostname-override bench-node \
        --node-ip $NODE_ADDR --cluster-cidr 10.244.0.0/16 --healthz-bind-address "" --metrics-bind-address "" \
        >"$TMP/sluice-$mode.log" 2>&1 &
    SLUICE_PID=$!
    PIDS+=("$SLUICE_PID")
    wait_http "http://$CLUSTER_IP/" || { tail -20 "$TMP/sluice-$mode.log" >&2; exit 1; }
}
stop_sluice() {
    kill -TERM "$SLUICE_PID"
    wait "$SLUICE_PID" 2>/dev/null || true
    in_ns "$NS_NODE" "$SLUICE_BIN" --cleanup >/dev/null 2>&1
}

# --- measurements ---------------------------------------------------------------------------
# to_ms VALUE: wrk's "1.23ms" / "456.00us" / "1.02s" in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n }'
}

RESULTS=()   # "path|pattern|round|rps|p50|p99|errors"
measure() {
    local path=$1 url=$2 round=$3 pattern
    for pattern in keepalive newconn; do
        local args=(-t "$THREADS" -c "$CONNECTIONS" -d "${DURATION}s" --latency)
        [[ $pattern == newconn ]] && args+=(-H "Connection: close")
        in_ns "$NS_CLI" wrk "${args[@]}" -d 1s "$url" >/dev/null 2>&1 || true   # warm-up
        local out
        out=$(in_ns "$NS_CLI" wrk "${args[@]}" "$url" 2>&1)
        echo "$out" >"$TMP/wrk-$path-$pattern-$round.txt"
        local rps p50 p99 errors
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
        p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
        errors=$(awk '/Socket errors:|Non-2xx/ {gsub(/,/, ""); s = s $0 "; "} END {print s}' <<<"$out")
        RESULTS+=("$path|$pattern|$round|$rps|$p50|$p99|${errors:-none}")
        printf '  round %s  %-10s %-9s %10s req/s   p50 %8s ms   p99 %8s ms   %s\n' "$round" "$path" "$pattern" "$rps" "$p50" "$p99" "${errors:-}"
    done
}

echo "== $(nproc) CPUs, kernel $(uname -r), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s per measurement, $ROUNDS rounds"
wait_http "http://10.244.2.10:8080/"
wait_http "http://$NODE_ADDR:$(port 9080 haproxy 1)/" || { cat "$TMP/haproxy.log" >&2; exit 1; }
for round in $(seq "$ROUNDS"); do
    measure direct "http://10.244.2.10:$(port 8080 direct "$round")/" "$round"
    start_sluice iptables "$(port 8080 iptables "$round")"
    measure iptables "http://$CLUSTER_IP/" "$round"
    stop_sluice
    start_sluice userspace "$(port 8080 userspace "$round")"
    measure userspace "http://$CLUSTER_IP/" "$round"
    stop_sluice
    measure haproxy "http://$NODE_ADDR:$(port 9080 haproxy "$round")/" "$round"
done

# median VALUES...: the middle value (the lower middle for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# --- report ---------------------------------------------------------------------------
mkdir -p benchmarks/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
md="benchmarks/results/userspace-datapath-$stamp.md"
csv="benchmarks/results/userspace-datapath-$stamp.csv"
echo "path,pattern,round,requests_per_second,p50_ms,p99_ms,errors" >"$csv"
for r in "${RESULTS[@]}"; do
    IFS='|' read -r path pattern round rps p50 p99 errors <<<"$r"
    echo "$path,$pattern,$round,$rps,$p50,$p99,\"$errors\"" >>"$csv"
done
{
    echo "# Userspace data path: $stamp"
    echo
    echo "$(nproc) CPUs, kernel $(uname -r), $(iptables --version), $(haproxy -v 2>/dev/null | head -1 | awk '{print "haproxy", $3}'),"
    echo "$(nginx -v 2>&1 | sed 's/.*: //') backends, wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}') -t$THREADS -c$CONNECTIONS -d${DURATION}s,"
    echo "$ROUNDS rounds (paths interleaved); each cell is the median over the rounds (every round is in the CSV)."
    echo "sluice: $SLUICE_BIN. Everything shares the same CPUs (client, proxy, backends)."
    echo
    echo "keepalive: requests over established connections. newconn: \`Connection: close\`, one TCP connection per request."
    echo "direct goes to one backend (one nginx worker); the other paths spread over both."
    echo
    echo "| path | pattern | requests/s | p50 (ms) | p99 (ms) | rounds with errors |"
    echo "|---|---|---:|---:|---:|---:|"
    for path in direct iptables userspace haproxy; do
        for pattern in keepalive newconn; do
            rps=() p50s=() p99s=() bad=0
            for r in "${RESULTS[@]}"; do
                IFS='|' read -r rpath rpattern _ rrps rp50 rp99 rerrors <<<"$r"
                [[ $rpath == "$path" && $rpattern == "$pattern" ]] || continue
                rps+=("$rrps") p50s+=("$rp50") p99s+=("$rp99")
                [[ $rerrors == none ]] || bad=$((bad + 1))
            done
            echo "| $path | $pattern | $(median "${rps[@]}") | $(median "${p50s[@]}") | $(median "${p99s[@]}") | $bad |"
        done
    done
} >"$md"
echo "== wrote $md and $csv"
cat "$md"
