#!/usr/bin/env bash
# `make demo`: run sluice in iptables mode against a throw-away network of
# Linux network namespaces on this host, and send real TCP/UDP traffic through
# the Service it programs (examples/web.yaml).
#
#   sudo scripts/demo.sh            (SLUICE_BIN defaults to .build/debug/sluice)
#
# Needs: root, iproute2 (`ip`), iptables (`iptables-save`), /usr/bin/python3,
# and a built sluice binary. Relative paths are taken from the repository root.
#
# Address plan (each pod has its own /24 of the cluster CIDR 10.244.0.0/16,
# the node namespace is the gateway of every link):
#
#   namespace  interface  address            node side (node namespace)
#   client     eth0       10.244.1.10/24     vclient 10.244.1.1/24
#   be1        eth0       10.244.2.10/24     vbe1    10.244.2.1/24   backend-1 :8080/tcp :5353/udp
#   be2        eth0       10.244.3.10/24     vbe2    10.244.3.1/24   backend-2 :8080/tcp :5353/udp
#   ext        eth0       192.168.50.10/24   vext    192.168.50.1/24 (the node IP, "outside" world)
#
#   Service demo/web: ClusterIP 10.96.0.10, 80/tcp -> 8080, 53/udp -> 5353,
#   NodePort 30080/tcp on the node IP 192.168.50.1.
#
# Pod namespaces route only 10.244.0.0/16 and 10.96.0.0/12 via the node (no
# default route: nothing may leave, and name lookups fail at once). `ext` knows
# only its own /24, so a backend can answer it only if sluice masquerades the
# NodePort traffic. The node routes 10.96.0.0/12 out of its "uplink" vext, as a
# real node's default route would, so node-local clients can reach ClusterIPs.
#
# Everything made here (namespaces, processes, temp files) is removed by the
# EXIT/INT/TERM trap, also when interrupted; the host's own namespace is never
# touched (ip_forward, iptables and conntrack state all live in the namespaces).

set -euo pipefail

# --- settings ----------------------------------------------------------------

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SLUICE_BIN=${SLUICE_BIN:-.build/debug/sluice}
PYTHON=${PYTHON:-/usr/bin/python3}    # not a pyenv shim: those take seconds per start
TESTBED="$REPO_ROOT/scripts/testbed"
MANIFESTS=examples

P="sld$$"                             # unique prefix: parallel demos don't collide
NS_NODE="$P-node" NS_CLIENT="$P-client" NS_BE1="$P-be1" NS_BE2="$P-be2" NS_EXT="$P-ext"

CLUSTER_IP=10.96.0.10
NODE_IP=192.168.50.1
NODE_PORT=30080

# --- cleanup (idempotent; runs on every exit path) -----------------------------

PIDS=()          # processes we started
NAMESPACES=()    # namespaces we created (recorded *before* `ip netns add`)
TMP=""           # our temp directory
CLEANED=0

cleanup() {
    [[ $CLEANED == 1 ]] && return 0
    CLEANED=1
    set +e
    trap '' INT TERM               # a second Ctrl-C must not abort the cleanup
    local pid ns
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    # Stragglers inside our own namespaces (e.g. started just before a Ctrl-C,
    # before their PID was recorded) are ours too.
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
    done
    for _ in $(seq 20); do         # up to 2 s for a clean exit, then SIGKILL
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    # Deleting a namespace also deletes its veth ends, addresses, routes,
    # iptables tables and conntrack entries.
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
    [[ -n $TMP ]] && rm -rf "$TMP"
    return 0
}
trap cleanup EXIT
trap 'echo "demo: interrupted, cleaning up" >&2; cleanup; exit 130' INT
trap 'echo "demo: terminated, cleaning up" >&2; cleanup; exit 143' TERM

# --- helpers -------------------------------------------------------------------

say()  { printf '\n== %s\n' "$*"; }
die()  { echo "demo: $*" >&2; exit 1; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# nat_table: the node's nat table as iptables-save prints it. Plain
# iptables-save is whatever back end Debian's alternatives pick (nft); if sluice
# wrote with the other back end, fall back to iptables-legacy-save.
nat_table() {
    local out
    out=$(in_ns "$NS_NODE" iptables-save -t nat 2>/dev/null || true)
    if ! grep -q '^:KUBE-' <<<"$out" && command -v iptables-legacy-save >/dev/null; then
        out=$(in_ns "$NS_NODE" iptables-legacy-save -t nat 2>/dev/null || true)
    fi
    printf '%s\n' "$out"
}

show_sluice_log() {
    echo "---- sluice log ($SLUICE_LOG) ----" >&2
    tail -n 40 "$SLUICE_LOG" >&2 || true
    echo "---- end of sluice log ----" >&2
}

add_ns() {
    # Never adopt (and later delete) a namespace that someone else made.
    [[ -e /run/netns/$1 ]] && die "network namespace $1 already exists"
    NAMESPACES+=("$1")
    ip netns add "$1"
    ip -n "$1" link set lo up
}

# link_pod NS NODE_IF NODE_ADDR/LEN POD_ADDR/LEN: veth from the node to a
# pod namespace; the pod gets routes to the pod and service CIDRs only.
link_pod() {
    local ns=$1 node_if=$2 node_addr=$3 pod_addr=$4
    ip link add "$node_if" netns "$NS_NODE" type veth peer name eth0 netns "$ns"
    ip -n "$NS_NODE" addr add "$node_addr" dev "$node_if"
    ip -n "$NS_NODE" link set "$node_if" up
    ip -n "$ns" addr add "$pod_addr" dev eth0
    ip -n "$ns" link set eth0 up
    local gw=${node_addr%/*}
    ip -n "$ns" route add 10.244.0.0/16 via "$gw"
    ip -n "$ns" route add 10.96.0.0/12 via "$gw"
}

# start_backend NS NAME IP: run backend.py in NS and wait for its `ready`.
start_backend() {
    local ns=$1 name=$2 ip=$3 out="$TMP/$2.out"
    # Background jobs use `ip netns exec` directly, never through a shell
    # function: then $! is the process itself, not a subshell wrapping it.
    ip netns exec "$ns" "$PYTHON" "$TESTBED/backend.py" --name "$name" --bind "$ip" \
        --tcp-port 8080 --udp-port 5353 >"$out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do
        grep -qx ready "$out" && return 0
        kill -0 "$!" 2>/dev/null || { cat "$out" >&2; die "$name exited before it was ready"; }
        sleep 0.1
    done
    cat "$out" >&2
    die "$name not ready after 5 s"
}

# Results of all request batches, for the summary at the end.
declare -A HITS=()     # "LABEL|backend-N" -> count
FAILED=0               # requests without a backend answer

# requests LABEL NS PROTO TARGET COUNT: run client.py in NS, print every
# answer, count who answered.
requests() {
    local label=$1 ns=$2 proto=$3 target=$4 count=$5 line name n=0
    say "$label: $count $proto requests from ${ns#"$P-"} to $target"
    while IFS= read -r line; do
        n=$((n + 1))
        name=${line%% *}
        case $name in
            backend-*) HITS["$label|$name"]=$(( ${HITS["$label|$name"]:-0} + 1 ))
                       printf '  %2d  %-10s (backend saw client %s)\n' "$n" "$name" "${line#* }" ;;
            *)         FAILED=$((FAILED + 1))
                       printf '  %2d  %s   <-- no answer\n' "$n" "$line" ;;
        esac
    done < <(in_ns "$ns" "$PYTHON" "$TESTBED/client.py" --proto "$proto" \
                 --target "$target" --count "$count" --timeout 2 --show-source)
    if (( n != count )); then
        FAILED=$((FAILED + count - n))
        echo "  client.py printed $n of $count answers"
    fi
    printf '  distribution: backend-1: %d, backend-2: %d\n' \
        "${HITS["$label|backend-1"]:-0}" "${HITS["$label|backend-2"]:-0}"
}

# --- preflight -----------------------------------------------------------------

[[ $(id -u) == 0 ]] || die "must run as root (network namespaces, iptables)"
for tool in ip iptables-save; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install iproute2 iptables"
done
[[ -x $PYTHON ]] || die "$PYTHON not found (set PYTHON=...)"
[[ -x $SLUICE_BIN ]] || die "sluice binary $SLUICE_BIN not found or not executable: run 'swift build' first"
[[ -d $MANIFESTS ]] || die "manifest directory $MANIFESTS not found"
SLUICE_BIN=$(cd "$(dirname "$SLUICE_BIN")" && pwd)/$(basename "$SLUICE_BIN")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-demo.XXXXXX")
SLUICE_LOG="$TMP/sluice.log"

# --- the network ---------------------------------------------------------------

say "creating network namespaces $P-{node,client,be1,be2,ext}"
for ns in "$NS_NODE" "$NS_CLIENT" "$NS_BE1" "$NS_BE2" "$NS_EXT"; do add_ns "$ns"; done
in_ns "$NS_NODE" sysctl -qw net.ipv4.ip_forward=1      # per namespace; the host is untouched

link_pod "$NS_CLIENT" vclient 10.244.1.1/24 10.244.1.10/24
link_pod "$NS_BE1"    vbe1    10.244.2.1/24 10.244.2.10/24
link_pod "$NS_BE2"    vbe2    10.244.3.1/24 10.244.3.10/24

# The outside world: ext shares a /24 with the node IP and knows nothing else.
ip link add vext netns "$NS_NODE" type veth peer name eth0 netns "$NS_EXT"
ip -n "$NS_NODE" addr add "$NODE_IP/24" dev vext
ip -n "$NS_NODE" link set vext up
ip -n "$NS_EXT" addr add 192.168.50.10/24 dev eth0
ip -n "$NS_EXT" link set eth0 up
# Node-local clients need a route to the service CIDR before any nat rule runs
# (otherwise connect() fails with ENETUNREACH); send it out of the uplink.
ip -n "$NS_NODE" route add 10.96.0.0/12 dev vext

say "starting backends"
start_backend "$NS_BE1" backend-1 10.244.2.10
start_backend "$NS_BE2" backend-2 10.244.3.10
echo "  backend-1 on 10.244.2.10:8080/tcp,5353/udp; backend-2 on 10.244.3.10:8080/tcp,5353/udp"

# --- sluice --------------------------------------------------------------------

SLUICE_ARGS=(--proxy-mode iptables --manifests "$MANIFESTS" --hostname-override demo-node
             --node-ip "$NODE_IP" --cluster-cidr 10.244.0.0/16)
say "starting sluice in $NS_NODE: $SLUICE_BIN ${SLUICE_ARGS[*]}"
# `ip netns exec` execs the command, so $! is sluice's own PID (not via in_ns:
# a backgrounded shell function would make $! a subshell's PID).
ip netns exec "$NS_NODE" "$SLUICE_BIN" "${SLUICE_ARGS[@]}" >"$SLUICE_LOG" 2>&1 &
SLUICE_PID=$!
PIDS+=("$SLUICE_PID")
echo "  pid $SLUICE_PID, log $SLUICE_LOG"

ready=0
for _ in $(seq 150); do                                # up to 15 s
    if ! kill -0 "$SLUICE_PID" 2>/dev/null; then
        show_sluice_log
        die "sluice exited before programming any rules"
    fi
    if nat_table | grep -q '^:KUBE-SVC-'; then
        ready=1; break
    fi
    sleep 0.1
done
if [[ $ready != 1 ]]; then
    show_sluice_log
    die "no KUBE-SVC- chain in the node's nat table after 15 s"
fi
sleep 0.5       # let a sync that is still being written finish
echo "  rules are in place"

say "the nat table sluice wrote (iptables-save -t nat in $NS_NODE)"
NAT=$(nat_table)
printf '  %-34s %s\n' "KUBE- rules (-A KUBE-...):" "$(grep -c '^-A KUBE-' <<<"$NAT" || true)"
printf '  %-34s %s\n' "KUBE-SVC- chains:" "$(grep -c '^:KUBE-SVC-' <<<"$NAT" || true)"
printf '  %-34s %s\n' "KUBE-SEP- chains:" "$(grep -c '^:KUBE-SEP-' <<<"$NAT" || true)"
echo "  KUBE-SERVICES / KUBE-NODEPORTS:"
grep -E '^-A KUBE-(SERVICES|NODEPORTS) ' <<<"$NAT" | sed 's/^/    /' || true

# --- traffic -------------------------------------------------------------------

requests "ClusterIP tcp (pod)"    "$NS_CLIENT" tcp "$CLUSTER_IP:80"         20
requests "ClusterIP udp (pod)"    "$NS_CLIENT" udp "$CLUSTER_IP:53"         10
requests "NodePort tcp (external)" "$NS_EXT"   tcp "$NODE_IP:$NODE_PORT"    10
requests "NodePort tcp (node)"    "$NS_NODE"   tcp "$NODE_IP:$NODE_PORT"     5
requests "ClusterIP tcp (node)"   "$NS_NODE"   tcp "$CLUSTER_IP:80"          5

say "summary"
status=0
for label in "ClusterIP tcp (pod)" "ClusterIP udp (pod)" "NodePort tcp (external)" \
             "NodePort tcp (node)" "ClusterIP tcp (node)"; do
    printf '  %-26s backend-1: %2d, backend-2: %2d\n' "$label" \
        "${HITS["$label|backend-1"]:-0}" "${HITS["$label|backend-2"]:-0}"
done
if (( FAILED > 0 )); then
    echo "  FAIL: $FAILED request(s) got no answer from a backend"
    status=1
fi
if [[ -z ${HITS["ClusterIP tcp (pod)|backend-1"]:-} || -z ${HITS["ClusterIP tcp (pod)|backend-2"]:-} ]]; then
    echo "  FAIL: the 20 ClusterIP TCP requests did not reach both backends"
    status=1
fi

# --- stop sluice -----------------------------------------------------------------

say "stopping sluice (SIGTERM)"
kill -TERM "$SLUICE_PID"
for _ in $(seq 100); do kill -0 "$SLUICE_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SLUICE_PID" 2>/dev/null; then
    echo "  FAIL: sluice still running 10 s after SIGTERM"
    show_sluice_log
    exit 1                 # the trap kills it
fi
rc=0; wait "$SLUICE_PID" || rc=$?
# sluice is reaped now and its PID may be reused: drop it from the kill list.
keep=(); for pid in "${PIDS[@]}"; do [[ $pid == "$SLUICE_PID" ]] || keep+=("$pid"); done
PIDS=("${keep[@]}")
if [[ $rc != 0 ]]; then
    echo "  FAIL: sluice exited with status $rc after SIGTERM"
    status=1
else
    echo "  sluice exited 0"
fi

if [[ $status == 0 ]]; then
    say "demo passed"
else
    show_sluice_log
    say "demo FAILED"
fi
exit "$status"
