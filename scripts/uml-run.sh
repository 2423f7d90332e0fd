#!/usr/bin/env bash
# Run one command inside a throw-away user-mode Linux (UML) guest and return its
# standard output, standard error and exit status.
#
#   scripts/uml-run.sh CMD [ARGS...]
#
# Why: the host kernel of our CI machines has no IPVS and no dummy device; the
# Debian package user-mode-linux ships a 6.1 kernel (linux.uml) with both, as
# modules. The guest's root file system is the host's `/` (hostfs, read-write),
# so the command, its libraries and the project's files are all at the same paths;
# the guest's network namespaces, links, IPVS tables, ipsets, iptables and sysctls
# belong to the guest kernel and vanish with it.
#
# Contract (see docs/ipvs.md and the kernel-testing reference):
#   - the command runs as root in the guest, in the caller's working directory, with
#     the caller's exported environment plus UML_RUN=1;
#   - its stdout and stderr come back on ours (byte-exact: the consoles are raw);
#   - the exit status is the command's; 124 on timeout; 125 if the guest died without
#     reporting one (its kernel log is then printed on stderr).
#
# Knobs (environment):
#   UML_MEM      guest memory (default 1G)
#   UML_TIMEOUT  seconds before the guest is killed (default 1800)
#   UML_MODULES  modules loaded before the command (default: IPVS, ipset, iptables, veth,
#                dummy ...; empty = on-demand loading only)
#   UML_IPTABLES legacy (default) | nft: what plain `iptables*` runs in the guest. The UML
#                kernel has no nf_tables for IPv4, so nft only fails there.
#   UML_TMP      host (default) | tmpfs: whether /tmp in the guest is the host's /tmp
#   UML_VERBOSE  1 prints the guest kernel log on stderr even on success
#
# Needs: user-mode-linux and kmod (modprobe); iproute2, ipvsadm, ipset, iptables for
# most tests. Run as root.

set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

UML_BIN=${UML_BIN:-/usr/bin/linux.uml}
UML_MEM=${UML_MEM:-1G}
UML_TIMEOUT=${UML_TIMEOUT:-1800}
UML_IPTABLES=${UML_IPTABLES:-legacy}
UML_TMP=${UML_TMP:-host}
UML_VERBOSE=${UML_VERBOSE:-0}
DEFAULT_MODULES="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh dummy veth
    nf_conntrack nf_conntrack_netlink nf_nat ip_set ip_set_hash_ip ip_set_hash_ipport
    ip_set_hash_ipportip ip_set_hash_ipportnet ip_set_bitmap_port xt_set
    ip_tables iptable_nat iptable_filter iptable_mangle xt_comment xt_mark xt_addrtype
    xt_MASQUERADE xt_conntrack xt_nat xt_tcpudp xt_ipvs xt_physdev nf_reject_ipv4 ipt_REJECT"
UML_MODULES=${UML_MODULES-$DEFAULT_MODULES}

[[ -x $UML_BIN ]] || { echo "uml-run: $UML_BIN not found (apt-get install user-mode-linux)" >&2; exit 125; }
command -v modprobe >/dev/null 2>&1 || [[ -x /usr/sbin/modprobe ]] \
    || { echo "uml-run: modprobe not found (apt-get install kmod)" >&2; exit 125; }
KVER=$(ls /usr/lib/uml/modules 2>/dev/null | head -n1)
[[ -n $KVER ]] || { echo "uml-run: no module tree under /usr/lib/uml/modules" >&2; exit 125; }

# The exchange directory: the guest sees it through hostfs. linux.uml parses its
# command line on commas and spaces, so the path must have neither.
W=$(mktemp -d /var/tmp/uml.XXXXXX)
UML_PID=""
cleanup() {
    if [[ -n $UML_PID ]] && kill -0 "$UML_PID" 2>/dev/null; then
        kill -KILL -- "-$UML_PID" 2>/dev/null || kill -KILL "$UML_PID" 2>/dev/null || true
    fi
    rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The command, quoted, and the caller's environment.
{
    printf 'cd %q\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} > "$W/cmd"
export -p | grep -v -E '^declare -x (BASH_FUNC|SHLVL=|PWD=|OLDPWD=|_=)' > "$W/env" || true

cat > "$W/init" <<'EOF'
#!/bin/bash
# PID 1 of the guest.
W=$(dirname "$0")
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm 2>/dev/null || true
. "$W/settings"
if [[ $UML_TMP == tmpfs ]]; then mount -t tmpfs tmpfs /tmp; fi
# ip netns keeps its mount points under /run/netns and /var/run/netns (a link to /run).
mkdir -p /run/netns

# Kernel modules: the package's tree under a private prefix; the kernel's on-demand
# loading goes through the same wrapper.
mkdir -p /run/m/lib/modules
mount -t hostfs -o /usr/lib/uml/modules hostfs /run/m/lib/modules
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d /run/m "$@"\n' > /run/modprobe
chmod 755 /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
if [[ -n $UML_MODULES ]]; then
    /run/modprobe -a $UML_MODULES 2>>"$W/modprobe.log" || true
fi

# A private copy of /etc/alternatives so plain iptables* picks the wanted back end
# here only (the host's links are untouched).
mkdir -p /run/alternatives
cp -a /etc/alternatives/. /run/alternatives/
for t in iptables ip6tables; do
    for s in "" -restore -save; do
        if [[ -e /usr/sbin/$t-$UML_IPTABLES$s ]]; then
            ln -sfn "/usr/sbin/$t-$UML_IPTABLES$s" "/run/alternatives/$t$s"
        fi
    done
done
mount --bind /run/alternatives /etc/alternatives

ip link set lo up
hostname uml-guest 2>/dev/null || true
stty -F /dev/tty1 raw -echo 2>/dev/null
stty -F /dev/tty2 raw -echo 2>/dev/null

set +e
(
    set -a
    . "$W/env"
    set +a
    export UML_RUN=1
    . "$W/cmd"
) </dev/null >/dev/tty1 2>/dev/tty2
echo $? > "$W/rc.tmp"
mv "$W/rc.tmp" "$W/rc"
sync
echo o > /proc/sysrq-trigger
# The power-off is asynchronous: PID 1 must not exit first (that panics the guest).
sleep 10
EOF
chmod +x "$W/init"
printf 'UML_TMP=%q\nUML_MODULES=%q\nUML_IPTABLES=%q\n' "$UML_TMP" "$(echo $UML_MODULES)" "$UML_IPTABLES" > "$W/settings"

# fd 3: the kernel console (a log file); fd 1/2: the command's stdout/stderr.
set +e
timeout --kill-after=5 "$UML_TIMEOUT" "$UML_BIN" mem="$UML_MEM" root=/dev/root rootfstype=hostfs rootflags=/ rw \
    init="$W/init" con0=null,fd:3 con1=null,fd:1 con2=null,fd:2 con=null ssl=null \
    uml_dir="$W/" umid="uml$$" quiet </dev/null 3>"$W/kernel.log" &
UML_PID=$!
wait "$UML_PID"
status=$?
UML_PID=""
set -e

if [[ $status -eq 124 || $status -eq 137 ]] && [[ ! -s $W/rc ]]; then
    echo "uml-run: timed out after ${UML_TIMEOUT}s" >&2
    exit 124
fi
if [[ ! -s $W/rc ]]; then
    echo "uml-run: the guest ended without an exit status (linux.uml status $status); kernel log:" >&2
    tail -n 60 "$W/kernel.log" >&2 || true
    exit 125
fi
if [[ $UML_VERBOSE == 1 ]]; then
    { echo "--- uml-run: guest kernel log"; cat "$W/kernel.log"; cat "$W/modprobe.log" 2>/dev/null; } >&2
fi
exit "$(cat "$W/rc")"
