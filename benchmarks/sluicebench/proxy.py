"""The proxy under test: a `sluice` process in the node namespace, its metrics and its log.

Sync times come from Sluice's own `kubeproxy_sync_proxy_rules_duration_seconds` histogram:
the difference of `_sum` over the difference of `_count` between two scrapes is the mean
duration of the syncs in between (exact: the sum is not bucketed). Bytes written come from
the log line every sync prints ("partial sync: N service ports, C changed, B bytes").
"""

import json
import os
import re
import subprocess
import time
import urllib.request

from . import fixtures as fx
from . import netns

METRICS_PORT = 10249
HEALTHZ_PORT = 10256
SYNC_LINE = re.compile(r"(full|partial) sync: (\d+) service ports, (\d+) changed, (\d+) bytes")


IP_FAMILY_LABEL = re.compile(r'ip_family="[^"]*",?')


def parse_metrics(text):
    """Prometheus text -> {name or name{labels}: float}.

    Series labelled `ip_family` (the per-proxier series, as kube-proxy 1.33+ labels them) are
    also summed under their key without that label (`name`, or `name{other labels}`), which
    is what the harness reads: it runs one family at a time."""
    out = {}
    summed = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            key, value = line.rsplit(" ", 1)
            key, v = key.strip(), float(value)
        except ValueError:
            continue
        out[key] = v
        if 'ip_family="' in key:
            bare = IP_FAMILY_LABEL.sub("", key).replace(",}", "}").replace("{}", "")
            summed[bare] = summed.get(bare, 0.0) + v
    for key, v in summed.items():
        out.setdefault(key, v)
    return out


def proxy_args(mode_args, manifests, extra=()):
    return ["--manifests", manifests, "--hostname-override", fx.NODE_NAME, "--node-ip", fx.NODE_IP,
            "--cluster-cidr", fx.CLUSTER_CIDR,
            # No periodic full resync inside a measurement (Sluice resyncs fully every
            # --sync-period, 30 s by default); the scenarios measure event-driven syncs.
            "--sync-period", "1h",
            "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
            "--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}"] + list(mode_args) + list(extra)


class Proxy:
    """A running sluice in `net.node`."""

    def __init__(self, binary, net, mode_args, manifests, log_path):
        self.net = net
        self.log_path = log_path
        self.started = time.monotonic()
        self.process = netns.start(net.node.cmd([binary] + proxy_args(mode_args, manifests)), log_path=log_path)
        self.pid = self.process.pid
        self.log_offset = 0

    def alive(self):
        return self.process.poll() is None

    def metrics(self):
        """One scrape (inside the node namespace); {} when the server does not answer yet."""
        with netns.entered(self.net.node):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
                    return parse_metrics(r.read().decode())
            except OSError:
                return {}

    FAILURES = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    NFT_FAILURES = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"

    def failure(self, m=None):
        """A message when Sluice has recorded a failed sync (its metrics count every failed
        sync as a restore failure, or in nftables mode as an nftables sync failure), else None."""
        m = self.metrics() if m is None else m
        failed = m.get(self.FAILURES, 0.0) + m.get(self.NFT_FAILURES, 0.0)
        if failed <= 0:
            return None
        lines = [l for l in self.tail(200).splitlines() if "sync failed" in l]
        return f"sluice reported {failed:.0f} failed sync(s): " + (lines[0].split("] ", 1)[-1] if lines else "see its log")

    def sync_counters(self):
        m = self.metrics()
        return (m.get("kubeproxy_sync_proxy_rules_duration_seconds_count", 0.0),
                m.get("kubeproxy_sync_proxy_rules_duration_seconds_sum", 0.0), m)

    def wait_syncs(self, count, timeout):
        """Waits until at least `count` syncs are recorded; returns (count, sum, metrics)."""
        deadline = time.monotonic() + timeout
        while True:
            c, s, m = self.sync_counters()
            if self.failure(m):
                raise RuntimeError(self.failure(m))
            if c >= count:
                return c, s, m
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError(f"sluice recorded {c:.0f} syncs, wanted {count:.0f}; log {self.log_path}:\n" + self.tail())
            time.sleep(0.05)

    def new_sync_lines(self):
        """Sync log lines since the previous call: [(kind, service ports, changed, bytes)]."""
        with open(self.log_path, errors="replace") as f:
            f.seek(self.log_offset)
            text = f.read()
            self.log_offset = f.tell()
        return [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in SYNC_LINE.finditer(text)]

    def tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def peak_rss(self):
        return netns.vm_hwm(self.pid)

    def stop(self):
        return netns.stop(self.process, timeout=20)


def bench_compile_binary(sluice):
    """`sluice-bench-compile`, built beside the `sluice` binary (the same build directory:
    `swift build` builds both; `make release` builds both products)."""
    return os.path.join(os.path.dirname(os.path.abspath(sluice)), "sluice-bench-compile")


def compile_args(mode_args, manifests):
    """The proxy flags that bear on compilation, as `proxy_args` gives them to sluice."""
    return ["--manifests", manifests, "--hostname-override", fx.NODE_NAME, "--node-ip", fx.NODE_IP,
            "--cluster-cidr", fx.CLUSTER_CIDR] + list(mode_args)


class Compiler:
    """`sluice-bench-compile` in the node namespace: in-process compile timings and the
    payload of every step, written to `outdir`. `binary` is the sluice binary; the helper
    is found beside it."""

    def __init__(self, binary, ns, mode_args, manifests, outdir, repeat):
        helper = bench_compile_binary(binary)
        if not os.access(helper, os.X_OK):
            raise RuntimeError(f"{helper} is missing: build it with sluice (swift build, or make release)")
        args = [helper, "--out", outdir, "--repeat-count", str(repeat)] + compile_args(mode_args, manifests)
        self.p = netns.start(ns.cmd(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self._read()

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            err = self.p.stderr.read()
            raise RuntimeError(f"sluice-bench-compile failed: {err.strip()[-2000:]}")
        return json.loads(line)

    def step(self, name, full=False):
        self.p.stdin.write(f"{'full' if full else 'step'} {name}\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except OSError:
            pass
        netns.stop(self.p, timeout=10)
