"""Proxy modes the harness knows. A mode says how to start sluice, whether it can run here,
how to count what the kernel holds, and which kernel-tool baseline it is compared with.

A mode is measured when `sluice --help` lists it among the --proxy-mode values and its
environment is there (IPVS: user-mode Linux via scripts/uml-run.sh, since the host kernel
has no IPVS); otherwise the report says "not measured" with the reason.
"""

import os
import re
import shutil
import subprocess
import time

from . import netns

IPTABLES_RESTORE_FLAGS = ["-w", "5", "-W", "100000", "--noflush", "--counters"]


def timed(args, input_path=None, ns=None):
    """Runs a command (inside `ns` when given, without `ip netns exec` in between) and
    returns its wall time in seconds. The child inherits the calling thread's namespace."""
    stdin = open(input_path) if input_path else subprocess.DEVNULL
    try:
        if ns is not None:
            with netns.entered(ns):
                t0 = time.monotonic()
                r = subprocess.run(args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                t1 = time.monotonic()
        else:
            t0 = time.monotonic()
            r = subprocess.run(args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            t1 = time.monotonic()
    finally:
        if input_path:
            stdin.close()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} < {input_path} failed ({r.returncode}): {r.stderr.strip()[:1500]}")
    return t1 - t0


def listed_modes(sluice_help):
    """Proxy modes `sluice --help` offers, e.g. {"iptables", "ipvs"}."""
    m = re.search(r"--proxy-mode[^\n]*\n?(.*?)(?:\n\s*--|\Z)", sluice_help, re.S)
    text = m.group(0) if m else sluice_help
    return {w for w in ("iptables", "ipvs", "userspace", "nftables") if w in text}


class Mode:
    key = ""
    label = ""
    proxy_mode = ""
    in_uml = False
    compile_supported = False       # `sluice-bench-compile` knows the mode
    restore_baselines = False       # iptables-restore payload baselines apply
    # What "rules" means for this mode in the report.
    unit = "rules"

    def proxy_args(self):
        return ["--proxy-mode", self.proxy_mode]

    def unavailable(self, ctx):
        """None when this mode can be measured here, else the reason."""
        if self.proxy_mode not in ctx.sluice_modes:
            return f"sluice --help does not list --proxy-mode {self.proxy_mode} (mode not in this build)"
        if self.proxy_mode != "iptables" and self._mode_disabled(ctx):
            return f"--proxy-mode {self.proxy_mode} is listed but says it is not available yet"
        return None

    def _mode_disabled(self, ctx):
        return ctx.mode_probe(self.proxy_mode)

    def kernel_count(self, ns):
        return None

    def canary_check_time(self, ns):
        """Time of what a backend runs before each partial sync besides the restore (None if
        nothing or unknown)."""
        return None

    def flush_baseline(self, case):
        return False

    def grows(self, case):
        """True when the proxy's state is built up file by file instead of by one cold full
        sync (which would not finish in the time budget). No mode needs it any more."""
        return False

    def same_payload_cold(self, case):
        """Whether to time the kernel tool's restore of the whole full payload, with Sluice's
        flags, into an empty namespace."""
        return True


class IPTables(Mode):
    compile_supported = True
    restore_baselines = True

    def __init__(self, variant):
        self.variant = variant
        self.key = f"iptables-{variant}"
        self.label = f"iptables ({variant})"
        self.proxy_mode = "iptables"
        self.restore = f"iptables-{variant}-restore"
        self.save = f"iptables-{variant}-save"

    def proxy_args(self):
        return ["--proxy-mode", "iptables", "--iptables-backend", self.variant]

    def unavailable(self, ctx):
        if not shutil.which(self.restore):
            return f"{self.restore} is not installed"
        return super().unavailable(ctx)

    def kernel_count(self, ns):
        """Rules (-A lines) in every table of `ns`."""
        with netns.entered(ns):
            r = subprocess.run([self.save], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return sum(1 for line in r.stdout.splitlines() if line.startswith("-A "))

    def restore_time(self, ns, path):
        """iptables-restore with Sluice's own flags (--noflush --counters)."""
        return timed([self.restore] + IPTABLES_RESTORE_FLAGS, path, ns)

    def canary_check_time(self, ns):
        """The iptables backend's canary check (one `iptables -S KUBE-PROXY-CANARY` per table),
        which Sluice runs before every partial sync."""
        total = 0.0
        for table in ("mangle", "nat", "filter"):
            total += timed([self.restore.replace("-restore", ""), "-w", "5", "-t", table, "-S", "KUBE-PROXY-CANARY"], None, ns)
        return total

    def restore_flush_time(self, ns, path):
        """The same without --noflush: the tables named in the payload are flushed first."""
        return timed([self.restore] + [f for f in IPTABLES_RESTORE_FLAGS if f != "--noflush"], path, ns)

    # iptables-nft 1.8.9's --noflush restore costs about (rules x chains) of the payload: a
    # full payload of 1 000 Services x 10 endpoints takes seconds, of 3 000 a minute or two,
    # of 10 000 longer than this whole benchmark may run (see the report). Sluice's own full
    # sync cuts it into batches (FullSyncPlan) and starts cold at every size; the kernel
    # tool's single --noflush restore of the whole payload is timed only up to this many chains.
    NFT_COLD_CHAINS = 12000

    def same_payload_cold(self, case):
        return self.variant != "nft" or case.s * (case.e + 1) <= self.NFT_COLD_CHAINS

    def flush_baseline(self, case):
        """A flushing restore of the full payload (the tables named are flushed first): the
        floor Sluice's full sync is held to, on both back ends."""
        return True

    def version(self):
        r = subprocess.run([self.restore.replace("-restore", ""), "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return r.stdout.strip()


class IPVS(Mode):
    key = "ipvs"
    label = "IPVS (in UML)"
    proxy_mode = "ipvs"
    in_uml = True
    compile_supported = True
    unit = "virtual + real servers"

    def unavailable(self, ctx):
        reason = super().unavailable(ctx)
        if reason:
            return reason
        return ctx.uml_unavailable()

    def kernel_count(self, ns):
        with netns.entered(ns):
            r = subprocess.run(["ipvsadm", "-Ln"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return sum(1 for line in r.stdout.splitlines() if line.startswith(("TCP", "UDP", "SCTP", "  ->")) and "RemoteAddress" not in line)


class Userspace(Mode):
    key = "userspace"
    label = "userspace"
    proxy_mode = "userspace"
    unit = "rules"

    def kernel_count(self, ns):
        with netns.entered(ns):
            r = subprocess.run(["iptables-save"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return sum(1 for line in r.stdout.splitlines() if line.startswith("-A "))


class NFTables(Mode):
    """kube-proxy's nftables ruleset through libnftables. Its floors are `nft -f` of the same
    transaction: the full one into an empty namespace, and each change's partial transaction
    (Sluice's partial transaction is already the minimal one: only the changed chains and
    elements) on the proxy's own state."""
    key = "nftables"
    label = "nftables"
    proxy_mode = "nftables"
    compile_supported = True
    restore_baselines = True
    minimal_is_payload = True
    unit = "rules"

    def unavailable(self, ctx):
        if not shutil.which("nft"):
            return "nft is not installed (Debian package nftables)"
        return super().unavailable(ctx)

    def restore_time(self, ns, path):
        """`nft -f` of the transaction (one batch, as the proxy sends it through libnftables)."""
        return timed(["nft", "-f", path], None, ns)

    def restore_flush_time(self, ns, path):
        """Never asked for (no flush baseline): a full transaction replaces the table's contents."""
        return self.restore_time(ns, path)

    def kernel_count(self, ns):
        """Rules in table ip kube-proxy (statement lines of `nft list table`)."""
        with netns.entered(ns):
            r = subprocess.run(["nft", "list", "table", "ip", "kube-proxy"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        count, depth, in_chain = 0, 0, False
        for line in r.stdout.splitlines():
            t = line.strip()
            if t.startswith("chain ") and t.endswith("{"):
                in_chain = True
                continue
            if t == "}":
                in_chain = False
                continue
            if in_chain and t and not t.startswith(("type ", "comment ")):
                count += 1
        return count

    def version(self):
        r = subprocess.run(["nft", "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return r.stdout.strip()


ALL = {
    "iptables-nft": IPTables("nft"),
    "iptables-legacy": IPTables("legacy"),
    "ipvs": IPVS(),
    "userspace": Userspace(),
    "nftables": NFTables(),
}
