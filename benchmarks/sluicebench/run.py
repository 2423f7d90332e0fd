"""One benchmark case: a mode at S Services x E endpoints with a Service-type mix.

Order of work in a case (each step's numbers are recorded as samples):

1. compile   `sluice-bench-compile` reads the fixture and walks the same steps the proxy
             will see; it times snapshot + compile + render in-process and writes every
             payload (iptables modes).
2. kernel    the kernel tool alone on the same state, in a namespace of its own:
             `iptables-restore --noflush` of the full payload into an empty namespace
             (cold), then of each step's exact payload, and of the minimal payload.
3. proxy     sluice started cold in a fresh test network: time until the probe Service
             answers and the first sync has ended (end to end; a chunked full sync serves
             its first Services before its last), its first (full) sync from its metrics,
             peak RSS.
             Repeated; the last instance then runs the change scenarios: add one Service,
             delete it, change one endpoint (toggled), a churn storm, and the data path.
"""

import json
import os
import shutil
import signal
import subprocess
import time

from . import fixtures as fx
from . import netns, payload, probe
from .proxy import Compiler, Proxy

MIN_SYNC_GAP = 1.2      # > sluice's default --min-sync-period (1 s): each change syncs at once


class Case:
    def __init__(self, s, e, mix="clusterip", cold_reps=3, change_reps=5, churn_reps=1, datapath=False, note=""):
        self.s, self.e, self.mix = s, e, mix
        self.cold_reps, self.change_reps, self.churn_reps = cold_reps, change_reps, churn_reps
        self.datapath = datapath
        self.note = note

    @property
    def name(self):
        return fx.fixture_name(self.s, self.e, self.mix)


def _hardlink_tree(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.startswith("."):
            continue
        try:
            os.link(os.path.join(src, f), os.path.join(dst, f))
        except OSError:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))


class Scenario:
    """The file changes of the scenarios, identical for bench-compile and for the proxy."""

    def __init__(self, case, manifests):
        self.case = case
        self.dir = manifests
        self.generation = 0          # of the probe Service's endpoint
        self.churn_generation = 0    # of the other churn Services' first endpoint
        self.churn_order = list(range(1, fx.single_file_count(case.s))) + [0]

    def add(self):
        fx.write_atomic(os.path.join(self.dir, "zz-added.yaml"), fx.added_service_yaml())

    def delete(self):
        os.unlink(os.path.join(self.dir, "zz-added.yaml"))

    def change(self):
        self.generation ^= 1
        fx.write_atomic(os.path.join(self.dir, fx.single_file(0)), fx.probe_service_yaml(self.generation))

    def churn_write(self, i, generation):
        fx.write_atomic(os.path.join(self.dir, fx.single_file(i)), fx.service_yaml(i, self.case.e, self.case.mix, generation))


def run_case(ctx, mode, case):
    tags = {"mode": mode.key, "S": case.s, "E": case.e, "mix": case.mix}
    rec = ctx.results.recorder(tags)
    fixture = fx.generate(ctx.fixtures_dir, case.s, case.e, case.mix)
    work = os.path.join(ctx.tmp, f"{mode.key}-{case.name}")
    manifests = os.path.join(work, "manifests")
    payloads = os.path.join(work, "payloads")
    _hardlink_tree(fixture, manifests)
    os.makedirs(payloads, exist_ok=True)
    ctx.log(f"[{mode.key} S={case.s} E={case.e} {case.mix}] fixture {fixture}")

    steps = []
    if mode.compile_supported:
        steps = compile_steps(ctx, mode, case, manifests, payloads, rec)
        _hardlink_tree(fixture, manifests)          # back to the initial state
    baselines = payloads if mode.restore_baselines else None
    proxy_scenarios(ctx, mode, case, manifests, rec, baselines)


def compile_steps(ctx, mode, case, manifests, payloads, rec):
    """Walks the scenario steps through bench-compile; returns the step names in order."""
    ns = netns.Namespace("k")
    sc = Scenario(case, manifests)
    steps = ["full"]
    try:
        comp = Compiler(ctx.sluice, ns, mode.proxy_args(), manifests, payloads, ctx.plan.compile_repeat)
        _record_compile(rec, "cold", comp.first)
        rec("cold", "source_s", comp.first["scan_s"] + comp.first["apply_s"])
        rec("cold", "bytes", comp.first["bytes"])
        if mode.restore_baselines:
            rec("cold", "rules_written", comp.first["written_nat"] + comp.first["written_filter"])
        else:
            rec("cold", "virtual_servers", comp.first.get("virtual_servers"))
            rec("cold", "real_servers", comp.first.get("real_servers"))
        for name, action, scenario in [("add", sc.add, "add"), ("delete", sc.delete, "delete"),
                                       ("change1", sc.change, "change"), ("change0", sc.change, "change")]:
            action()
            r = comp.step(name)
            _record_compile(rec, scenario, r)
            if mode.restore_baselines:
                rec(scenario, "bytes", r["bytes"])
                rec(scenario, "rules_written", r["written_nat"] + r["written_filter"])
            steps.append(name)
        for g in (1, 0):
            for i in sc.churn_order:
                sc.churn_write(i, g)
            r = comp.step(f"churn{g}")
            _record_compile(rec, "churn", r)
            if mode.restore_baselines:
                rec("churn", "bytes", r["bytes"])
            steps.append(f"churn{g}")
        comp.close()
    finally:
        ns.delete()
    if not mode.restore_baselines:
        return steps
    if getattr(mode, "minimal_is_payload", False):
        # nftables: the partial transaction is the minimal one already.
        for name in steps[1:5]:
            text = _read(payloads, name)
            with open(os.path.join(payloads, f"min-{name}.txt"), "w") as f:
                f.write(text)
            rec(_scenario_of(name), "bytes_min", len(text.encode()))
        return steps
    # Minimal payloads of the single-Service steps. `prev` is the last payload that wrote
    # KUBE-SERVICES (a partial payload leaves it out when it is unchanged).
    prev = "full"
    for name in steps[1:5]:
        service = "bench/svc-added" if name in ("add", "delete") else "bench/svc-00000"
        new = _read(payloads, name)
        text = payload.minimal(new, _read(payloads, prev), service)
        with open(os.path.join(payloads, f"min-{name}.txt"), "w") as f:
            f.write(text)
        rec(_scenario_of(name), "bytes_min", len(text.encode()))
        if payload.declares(new, "nat", "KUBE-SERVICES"):
            prev = name
    return steps


def _scenario_of(step):
    return {"add": "add", "delete": "delete", "change1": "change", "change0": "change"}.get(step, "churn")


def _read(d, name):
    with open(os.path.join(d, f"{name}.txt")) as f:
        return f.read()


def _record_compile(rec, scenario, r):
    for i, (c, t) in enumerate(zip(r["compile_s"], r["render_s"])):
        rec(scenario, "compile_s", c + t, rep=i)
    rec(scenario, "snapshot_s", r["snapshot_s"])


FLUSH_BASELINE_CHAINS = 250000    # a flushing restore is timed up to about this many chains (20 000 x 10: 220 000)


def cold_baselines(ctx, mode, case, payloads, rec, c):
    """The full payload into an empty namespace: with Sluice's flags (--noflush --counters; as
    one batch, not with iptables-nft at sizes where it would not finish) and without --noflush
    (a flushing restore: the floor of a full sync; up to FLUSH_BASELINE_CHAINS).
    Called once per cold start of the proxy, right after it."""
    full = os.path.join(payloads, "full.txt")
    flush = mode.flush_baseline(case) and case.s * (case.e + 1) <= FLUSH_BASELINE_CHAINS
    for metric, run, wanted in (("restore_same_s", mode.restore_time, mode.same_payload_cold(case)),
                                ("restore_flush_s", mode.restore_flush_time, flush)):
        if not wanted:
            continue
        ns = netns.Namespace("k")
        try:
            rec("cold", metric, run(ns, full), rep=c)
            if c == 0 and metric == "restore_flush_s":
                rec("cold", "kernel_rules", mode.kernel_count(ns))
        finally:
            ns.delete()


def change_baselines(ctx, mode, case, payloads, proxy, ns, generation, rec, rep):
    """iptables-restore of each change's exact payload and of its minimal payload, on the
    proxy's own state, right after the proxy made the same changes: the proxy is paused
    (SIGSTOP) and every pair of payloads (add + delete, change there + back) leaves the
    state as the proxy knows it."""
    path = lambda n: os.path.join(payloads, f"{n}.txt")
    changes = [f"change{1 - generation}", f"change{generation}"]
    proxy.process.send_signal(signal.SIGSTOP)
    try:
        for k, name in enumerate(["add", "delete"] + changes):
            rec(_scenario_of(name), "restore_same_s", mode.restore_time(ns, path(name)), rep=rep * 2 + k % 2)
        for k, name in enumerate(["add", "delete"] + changes):
            rec(_scenario_of(name), "restore_min_s", mode.restore_time(ns, path(f"min-{name}")), rep=rep * 2 + k % 2)
    finally:
        proxy.process.send_signal(signal.SIGCONT)


def churn_baselines(ctx, mode, case, payloads, ns, rec):
    """iptables-restore of the churn storm's payloads on the state the proxy left (it has
    been stopped; its rules stay). nftables transactions name the chains they flush, so they
    apply only to the state they were computed from: they are replayed in a namespace of
    their own (full, add, delete, change1, change0 untimed, then the churn ones timed)."""
    if getattr(mode, "minimal_is_payload", False):
        for r in range(case.churn_reps):
            own = netns.Namespace("k")
            try:
                for name in ("full", "add", "delete", "change1", "change0"):
                    mode.restore_time(own, os.path.join(payloads, f"{name}.txt"))
                for name in ("churn1", "churn0"):
                    rec("churn", "restore_same_s", mode.restore_time(own, os.path.join(payloads, f"{name}.txt")), rep=r)
            finally:
                own.delete()
        return
    for r in range(case.churn_reps):
        for name in ("churn1", "churn0"):
            rec("churn", "restore_same_s", mode.restore_time(ns, os.path.join(payloads, f"{name}.txt")), rep=r)


def proxy_scenarios(ctx, mode, case, manifests, rec, payloads=None):
    ip0 = fx.cluster_ip(0)
    cold_timeout = ctx.plan.cold_timeout(case)
    grows = mode.grows(case)
    held_back = []
    if grows:
        # Start from the single-file Services and the first multi-Service file; the rest
        # follow one file (about 5 000 endpoints) per sync.
        held_back = fx.chunk_files(manifests)[1:]
        hold = os.path.join(os.path.dirname(manifests), "held-back")
        os.makedirs(hold, exist_ok=True)
        for f in held_back:
            os.rename(os.path.join(manifests, f), os.path.join(hold, f))
    net = proxy = None
    cold_reps = 1 if grows else case.cold_reps
    for c in range(cold_reps):
        if proxy is not None:
            proxy.stop()
            net.close()
        net = netns.TestNetwork(ctx.netbench, ctx.tmp)
        log = os.path.join(ctx.tmp, f"sluice-{mode.key}-{case.name}-{c}.log")
        proxy = Proxy(ctx.sluice, net, mode.proxy_args(), manifests, log)
        t1 = probe.wait_for(net.client, ip0, fx.UDP_PORT, probe.answer_is(fx.probe_backend(0)), cold_timeout, t0=proxy.started,
                            abort=proxy.failure)
        if t1 is None:
            raise RuntimeError(f"the probe Service never answered within {cold_timeout:.0f} s; sluice log {log}:\n{proxy.tail()}")
        # The first sync may still run when the probe answers: a chunked full sync (the
        # nftables mode's cold start) serves its first Services long before its last. A cold
        # start ends when both are done.
        if proxy.sync_counters()[0] < 1:
            proxy.wait_syncs(1, max(60.0, cold_timeout - (time.monotonic() - proxy.started)))
            t1 = time.monotonic()
        count, total, m = proxy.wait_syncs(1, 60)
        _settle(proxy, gap=0)
        scenario = "grow-start" if grows else "cold"
        rec(scenario, "e2e_s", t1 - proxy.started, rep=c)
        rec(scenario, "sync_s", total / count, rep=c)
        rec(scenario, "rss_bytes", proxy.peak_rss(), rep=c)
        lines = proxy.new_sync_lines()
        if lines:
            rec(scenario, "bytes_sluice", lines[0][3], rep=c)
            rec(scenario, "service_ports", lines[0][1], rep=c)
        ctx.log(f"  {scenario} {c + 1}/{cold_reps}: e2e {t1 - proxy.started:.3f} s, sync {total / count:.3f} s")
        if payloads:
            cold_baselines(ctx, mode, case, payloads, rec, c)
    try:
        if grows:
            grow(ctx, proxy, rec, manifests, hold, held_back)
        rec("cold", "kernel_rules_sluice", mode.kernel_count(net.node))
        sc = Scenario(case, manifests)
        timeout = ctx.plan.change_timeout(case)
        for r in range(case.change_reps):
            _change(ctx, proxy, net, rec, "add", r, sc.add, fx.ADDED_CLUSTER_IP, probe.answer_is(fx.ADDED_BACKEND), timeout)
            _change(ctx, proxy, net, rec, "delete", r, sc.delete, fx.ADDED_CLUSTER_IP, probe.not_served(fx.ADDED_CLUSTER_IP), timeout, confirm=2)
            gen = sc.generation ^ 1
            _change(ctx, proxy, net, rec, "change", r, sc.change, ip0, probe.answer_is(fx.probe_backend(gen)), timeout)
            if payloads:
                _settle(proxy, gap=0)
                change_baselines(ctx, mode, case, payloads, proxy, net.node, sc.generation, rec, r)
        for r in range(case.churn_reps):
            _churn(ctx, proxy, net, rec, sc, r, timeout)
        if case.datapath:
            datapath(ctx, proxy, net, sc, rec)
        for r in range(3):
            rec("change", "canary_check_s", mode.canary_check_time(net.node), rep=r)
        rec("final", "rss_bytes", proxy.peak_rss())
        _, _, m = proxy.sync_counters()
        rec("final", "sync_failures", m.get("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", 0.0)
            + m.get("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", 0.0)
            + m.get("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", 0.0))
        status = proxy.stop()
        if status not in (0, None):
            ctx.log(f"  sluice exited with status {status}")
        if payloads:
            churn_baselines(ctx, mode, case, payloads, net.node, rec)
    finally:
        proxy.stop()
        net.close()


def grow(ctx, proxy, rec, manifests, hold, files):
    """Adds the held-back files one at a time, each after the previous sync: the proxy
    reaches S Services through partial syncs of about 5 000 endpoints each."""
    t_start = proxy.started
    total_sync = 0.0
    c0, s0 = _settle(proxy, gap=0)
    for k, f in enumerate(files):
        os.rename(os.path.join(hold, f), os.path.join(manifests, f))
        proxy.wait_syncs(c0 + 1, 900)
        c1, s1 = _settle(proxy, gap=0)
        # One file's events may be split over two syncs (a sync can start while the source
        # is still delivering them): a step's time is the sum of its syncs.
        total_sync += s1 - s0
        rec("grow", "sync_s", s1 - s0, rep=k)
        rec("grow", "syncs", c1 - c0, rep=k)
        c0, s0 = c1, s1
    rec("grow", "steps", len(files))
    rec("grow", "sync_total_s", total_sync)
    rec("grow", "elapsed_s", time.monotonic() - t_start)
    rec("grow", "rss_bytes", proxy.peak_rss())
    ctx.log(f"  grown in {len(files)} steps: syncs {total_sync:.1f} s, {time.monotonic() - t_start:.1f} s since start")


def _settle(proxy, gap=MIN_SYNC_GAP, timeout=900):
    """Waits until no sync is queued or running (Sluice's last successful sync ended after
    the last change was queued and left no changes pending, on two scrapes 0.3 s apart) and at least `gap` seconds have
    passed since that sync ended, so the next change is not held back by the minimum sync
    interval. Returns the sync count and duration sum then."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while True:
        c, s, m = proxy.sync_counters()
        if proxy.failure(m):
            raise RuntimeError(proxy.failure(m))
        last = m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0.0)
        queued = m.get("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", 0.0)
        # Changes that arrived while the last sync ran are still pending after it.
        pending = (m.get("kubeproxy_sync_proxy_rules_service_changes_pending", 0.0)
                   + m.get("kubeproxy_sync_proxy_rules_endpoint_changes_pending", 0.0))
        if last >= queued and pending == 0 and c > 0:
            quiet += 1
            wait = gap - (time.time() - last)
            if quiet >= 2 and wait <= 0:
                return c, s
            time.sleep(max(0.3, wait) if quiet >= 2 else 0.3)
            continue
        quiet = 0
        if time.monotonic() > deadline or not proxy.alive():
            raise RuntimeError(f"sluice did not settle within {timeout} s:\n{proxy.tail()}")
        time.sleep(0.05)


def _change(ctx, proxy, net, rec, scenario, rep, action, ip, done, timeout, confirm=1):
    c0, s0 = _settle(proxy)
    proxy.new_sync_lines()
    action()
    t0 = time.monotonic()
    t1 = probe.wait_for(net.client, ip, fx.UDP_PORT, done, timeout, t0=t0, confirm=confirm, abort=proxy.failure)
    if t1 is None:
        raise RuntimeError(f"{scenario}: the change was not visible within {timeout:.0f} s; sluice log:\n{proxy.tail()}")
    proxy.wait_syncs(c0 + 1, timeout)
    c1, s1 = _settle(proxy, gap=0)
    lines = proxy.new_sync_lines()
    # The time of every sync the change caused (normally one; the two objects of an added
    # Service can be split over two syncs when a sync starts between their events).
    rec(scenario, "e2e_s", t1 - t0, rep=rep)
    rec(scenario, "sync_s", s1 - s0, rep=rep)
    rec(scenario, "syncs", c1 - c0, rep=rep)
    if lines:
        rec(scenario, "bytes_sluice", sum(l[3] for l in lines), rep=rep)
    _record_written(proxy, rec, scenario, rep)
    ctx.log(f"  {scenario} {rep + 1}: e2e {t1 - t0:.3f} s, sync {s1 - s0:.3f} s in {c1 - c0:.0f}")


def _record_written(proxy, rec, scenario, rep):
    """What the last sync wrote, as Sluice's metrics count it: rules per table in iptables
    mode, netlink messages / set entries / addresses in IPVS mode."""
    _, _, m = proxy.sync_counters()
    # sluice_sync_last_written_objects{kind}; the report's keys are the tables and kinds of
    # earlier runs (nat, filter, ipvs, ipset, addresses).
    names = {"nat_rules": "nat", "filter_rules": "filter", "ipvs_messages": "ipvs", "ipset_entries": "ipset",
             "service_addresses": "addresses"}
    prefix = 'sluice_sync_last_written_objects{kind="'
    for k, val in m.items():
        if k.startswith(prefix):
            kind = k[len(prefix):].rstrip('"}')
            rec(scenario, "written_" + names.get(kind, kind), val, rep=rep)


def _churn(ctx, proxy, net, rec, sc, rep, timeout):
    """len(churn_order) Services changed (one endpoint each) within one second; the probe
    Service is written last, so once it answers from its new endpoint all changes are in."""
    c0, s0 = _settle(proxy)
    proxy.new_sync_lines()
    gen = sc.generation ^ 1
    sc.churn_generation ^= 1
    n = len(sc.churn_order)
    t_first = time.monotonic()
    for k, i in enumerate(sc.churn_order):
        if i == 0:
            sc.change()
        else:
            sc.churn_write(i, sc.churn_generation)
        pause = t_first + (k + 1) / n - time.monotonic()
        if pause > 0 and k + 1 < n:
            time.sleep(pause)
    t_last = time.monotonic()
    t1 = probe.wait_for(net.client, fx.cluster_ip(0), fx.UDP_PORT, probe.answer_is(fx.probe_backend(gen)), timeout, t0=t_last,
                        abort=proxy.failure)
    if t1 is None:
        raise RuntimeError(f"churn: the last change was not visible within {timeout:.0f} s; sluice log:\n{proxy.tail()}")
    c1, s1 = _settle(proxy)
    lines = proxy.new_sync_lines()
    rec("churn", "changes", n, rep=rep)
    rec("churn", "e2e_s", t1 - t_first, rep=rep)
    rec("churn", "e2e_last_s", t1 - t_last, rep=rep)
    rec("churn", "syncs", c1 - c0, rep=rep)
    rec("churn", "sync_s", (s1 - s0) / max(1, c1 - c0), rep=rep)
    rec("churn", "sync_total_s", s1 - s0, rep=rep)
    ctx.log(f"  churn {rep + 1}: {n} changes, e2e {t1 - t_first:.3f} s from the first, {c1 - c0:.0f} syncs")


def _load(net, args):
    with netns.entered(net.client):
        out = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"netbench load failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def datapath(ctx, proxy, net, sc, rec):
    """Requests per second and latency of TCP requests (a new connection each) from the
    client namespace: through the probe Service's ClusterIP (its rules come first in
    KUBE-SERVICES), through svc-last's (its rules come last, after all S Services), and to the
    same backend directly (through the node, without DNAT)."""
    last = os.path.join(sc.dir, "zz-last.yaml")
    fx.write_atomic(last, fx.last_service_yaml())
    if probe.wait_for(net.client, fx.LAST_CLUSTER_IP, fx.UDP_PORT, probe.answer_is(fx.ADDED_BACKEND), ctx.plan.change_timeout(sc.case)) is None:
        raise RuntimeError("datapath: svc-last never answered")
    _settle(proxy)
    targets = [("clusterip", f"{fx.cluster_ip(0)}:{fx.TCP_PORT}"),
               ("clusterip-last", f"{fx.LAST_CLUSTER_IP}:{fx.TCP_PORT}"),
               ("direct", f"{fx.probe_backend(sc.generation)}:{fx.TCP_TARGET}")]
    for r in range(ctx.plan.datapath_reps):
        # Rotate the order so no target always runs first (or last) in a noisy minute.
        order = targets[r % 3:] + targets[:r % 3]
        for kind, target in order:
            args = [ctx.netbench, "load", "--target", target, "--threads", str(ctx.plan.datapath_threads),
                    "--seconds", str(ctx.plan.datapath_seconds), "--warmup", "0.3"]
            d = _load(net, args)
            if d["requests"] == 0 and d["errors"] == 0:
                # Every client stalled for the whole window (seen once in user-mode Linux: a
                # lost SYN waits 1 s for its retransmission); measure once more, and say so.
                ctx.log(f"  datapath {kind}: no request completed in {ctx.plan.datapath_seconds} s; measuring again")
                d = _load(net, args)
            for k in ("rps", "p50_us", "p99_us", "mean_us", "errors"):
                rec(f"datapath-{kind}", k, d[k], rep=r)
            ctx.log(f"  datapath {kind}: {d['rps']:.0f} req/s, p50 {d['p50_us']} µs, p99 {d['p99_us']} µs, errors {d['errors']}")
    os.unlink(last)
    _settle(proxy)
