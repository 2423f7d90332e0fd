#!/usr/bin/python3
"""Sluice's benchmark harness: rule-sync latency and data path, measured side by side with
the kernel tools' own cost for the same state. See benchmarks/README.md.

    sudo benchmarks/bench.py --plan smoke|full [--sluice PATH] [--modes a,b] [--out DIR]

Writes DIR/samples.csv, DIR/summary.csv, DIR/report.md and DIR/*.svg.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
REPO = os.path.dirname(HERE)

from sluicebench import fixtures as fx            # noqa: E402
from sluicebench import modes as modes_mod        # noqa: E402
from sluicebench import netns, report, run        # noqa: E402
from sluicebench.results import Results           # noqa: E402
from sluicebench.run import Case                  # noqa: E402


class Plan:
    """What to run. `smoke` keeps S <= 100 and few repetitions (CI keeps the harness working);
    `full` reproduces the seed table's axes within about 30 minutes on 2 cores."""

    def __init__(self, name):
        self.name = name
        self.compile_repeat = 5
        self.datapath_reps = 2
        self.datapath_threads = 4
        self.datapath_seconds = 2.5
        if name == "smoke":
            self.compile_repeat = 3
            self.datapath_reps = 1
            # 2.5 s as in the full plan: in user-mode Linux a direct connection sometimes
            # stalls for over a second (CI once saw two 1 s windows without a request).
            self.datapath_seconds = 2.5
            self.cases = [Case(1, 10, cold_reps=2, change_reps=2, churn_reps=1, datapath=True),
                          Case(100, 10, cold_reps=2, change_reps=2, churn_reps=1, datapath=True)]
            self.uml_cases = [Case(100, 10, cold_reps=1, change_reps=2, churn_reps=1, datapath=True)]
            self.ipvs_baseline_scales = [(1, 10), (100, 10)]
        elif name == "full":
            # The seed table's axis (S, 10 endpoints each) in every mode; the endpoint count
            # and the Service-type mix only with iptables-nft, the default back end.
            sweep = [
                Case(1, 10, cold_reps=3, change_reps=3, churn_reps=1, datapath=True),
                Case(100, 10, cold_reps=3, change_reps=3, churn_reps=1),
                Case(1000, 10, cold_reps=2, change_reps=3, churn_reps=1),
                Case(5000, 10, cold_reps=2, change_reps=3, churn_reps=1),
                Case(10000, 10, cold_reps=1, change_reps=3, churn_reps=1, datapath=True),
                Case(20000, 10, cold_reps=1, change_reps=2, churn_reps=1),
            ]
            extra = [
                Case(1000, 1, cold_reps=2, change_reps=3, churn_reps=1, note="E sweep"),
                Case(1000, 100, cold_reps=1, change_reps=3, churn_reps=1, note="E sweep"),
                Case(1000, 10, mix="mixed", cold_reps=2, change_reps=3, churn_reps=1, note="mix"),
            ]
            self.cases = sweep + extra
            # Userspace stops at 10 000: 20 000 two-port Services need 40 000 listeners, over
            # this machine's hard open-file limit (20 000).
            self.mode_cases = {"iptables-nft": sweep + extra, "iptables-legacy": sweep,
                               "userspace": [c for c in sweep if c.s <= 10000]}
            self.uml_cases = [Case(1, 10, cold_reps=2, change_reps=3, churn_reps=1, datapath=True),
                              Case(1000, 10, cold_reps=2, change_reps=3, churn_reps=1),
                              Case(5000, 10, cold_reps=1, change_reps=2, churn_reps=1),
                              Case(20000, 10, cold_reps=1, change_reps=2, churn_reps=1)]
            # ipvsadm -R of 20 000 x 10 takes minutes in UML; 10 000 is left out for time.
            self.ipvs_baseline_scales = [(1, 10), (100, 10), (1000, 10), (5000, 10), (20000, 10)]
        else:
            raise SystemExit(f"unknown plan {name!r} (smoke or full)")

    def cases_for(self, mode):
        return getattr(self, "mode_cases", {}).get(mode, self.cases)

    def cold_timeout(self, case):
        return 60 + case.s * case.e * 0.004

    def change_timeout(self, case):
        return 30 + case.s * 0.004


class Context:
    def __init__(self, args, plan):
        self.plan = plan
        self.out = os.path.abspath(args.out)
        scratch = os.path.join(REPO, "benchmarks", "results", "tmp")
        self.tmp = os.path.abspath(args.tmp) if args.tmp else os.path.join(scratch, plan.name)
        self.fixtures_dir = os.path.join(scratch, "fixtures")
        self.sluice = os.path.abspath(args.sluice)
        self.results = Results()
        self.sluice_modes = set()
        self.uml_runner = args.uml_runner or os.path.join(REPO, "scripts", "uml-run.sh")
        self.netbench = None
        self._mode_cache = {}
        self.started = time.monotonic()

    def log(self, msg):
        el = time.monotonic() - self.started
        print(f"[{el:7.1f}s] {msg}", flush=True)

    def mode_probe(self, mode):
        """True when sluice refuses --proxy-mode `mode` as not available yet (asked in a
        throw-away namespace with an empty manifest directory, for at most 3 s)."""
        if mode in self._mode_cache:
            return self._mode_cache[mode]
        empty = os.path.join(self.tmp, "empty-manifests")
        os.makedirs(empty, exist_ok=True)
        ns = netns.Namespace("p")
        try:
            p = subprocess.Popen(ns.cmd([self.sluice, "--proxy-mode", mode, "--manifests", empty, "--hostname-override", "probe",
                                         "--metrics-bind-address", "", "--healthz-bind-address", ""]),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                out, _ = p.communicate(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            disabled = "not available yet" in out
        finally:
            ns.delete()
        self._mode_cache[mode] = disabled
        return disabled

    def uml_unavailable(self):
        if os.environ.get("UML_RUN") == "1":
            return None
        if not os.path.exists(self.uml_runner):
            return f"{os.path.relpath(self.uml_runner, REPO)} is not in this tree (IPVS needs user-mode Linux here)"
        if not shutil.which("linux.uml") and not os.path.exists("/usr/bin/linux.uml"):
            return "user-mode-linux is not installed"
        return None


def build_netbench(ctx):
    bindir = os.path.join(ctx.tmp, "bin")
    os.makedirs(bindir, exist_ok=True)
    out = os.path.join(bindir, "netbench")
    src = os.path.join(HERE, "tools", "netbench.c")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    cc = shutil.which("clang") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("bench: no C compiler (clang from the Swift toolchain, or cc) to build tools/netbench.c")
    subprocess.run([cc, "-O2", "-pthread", "-o", out, src], check=True)
    return out


def machine_info(ctx):
    def cmd(args):
        try:
            r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
            return r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    commit = cmd(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], stdout=subprocess.PIPE, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem,
        "kernel": platform.release(), "os": cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "iptables": cmd(["iptables", "--version"]),
        "iptables_nft": cmd(["iptables-nft", "--version"]), "iptables_legacy": cmd(["iptables-legacy", "--version"]),
        "ipvsadm": cmd(["dpkg-query", "-W", "-f=ipvsadm ${Version}", "ipvsadm"]), "ipset": cmd(["ipset", "--version"]),
        "uml_package": cmd(["dpkg-query", "-W", "-f=user-mode-linux ${Version}", "user-mode-linux"]),
        "sluice": cmd([ctx.sluice, "--version"]), "sluice_binary": os.path.relpath(ctx.sluice, REPO),
        "commit": commit + ("+local changes" if dirty else ""),
        "swift": cmd(["swift", "--version"]),
        "python": platform.python_version(),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def run_uml(ctx, args):
    """Runs the IPVS part inside user-mode Linux: this script, as a worker, in the guest."""
    out_json = os.path.join(ctx.tmp, "uml-results.json")
    if os.path.exists(out_json):
        os.unlink(out_json)
    cmd = [ctx.uml_runner, "/usr/bin/python3", os.path.abspath(__file__), "--worker", "uml", "--plan", ctx.plan.name,
           "--sluice", ctx.sluice, "--out", ctx.out, "--tmp", os.path.join(ctx.tmp, "uml"), "--results-json", out_json,
           "--modes", ",".join(m for m in args.modes.split(",") if m == "ipvs"), "--netbench", ctx.netbench]
    if args.cases:
        cmd += ["--cases", args.cases]
    env = dict(os.environ, UML_MEM=os.environ.get("UML_MEM", "6G"), UML_TIMEOUT=os.environ.get("UML_TIMEOUT", "1500"))
    ctx.log(f"user-mode Linux: {' '.join(cmd)}")
    r = subprocess.run(cmd, env=env)
    if os.path.exists(out_json):
        with open(out_json) as f:
            ctx.results.merge_json(json.load(f))
    if r.returncode != 0:
        ctx.results.failures.append(({"mode": "ipvs"}, f"the user-mode Linux run exited with status {r.returncode}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", help="smoke (S <= 100, a few minutes; the default) or full (about 30 minutes); with "
                    "--report-only, the run's own plan unless given")
    ap.add_argument("--sluice", default=os.path.join(REPO, ".build-release", "release", "sluice"), help="the sluice binary to measure")
    ap.add_argument("--modes", default="iptables-nft,iptables-legacy,ipvs,userspace,nftables", help="modes to measure (comma-separated)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"), help="where the report goes")
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--results-json", help=argparse.SUPPRESS)
    ap.add_argument("--uml-runner", help="scripts/uml-run.sh by default")
    ap.add_argument("--cases", help="only these cases of the plan, e.g. 1000x10,1000x10mixed (for development)")
    ap.add_argument("--netbench", help=argparse.SUPPRESS)
    ap.add_argument("--strict", action="store_true",
                    help="fail when a wanted mode cannot be measured here (CI: every mode must run)")
    ap.add_argument("--report-only", metavar="RESULTS_JSON",
                    help="only write the report (and CSV) again from a run's results.json (kept in benchmarks/results/tmp/PLAN/)")
    args = ap.parse_args()

    if args.report_only:
        results = Results()
        with open(args.report_only) as f:
            saved = json.load(f)
        results.merge_json(saved)
        plan = Plan(args.plan or saved.get("info", {}).get("plan") or "smoke")
        os.makedirs(args.out, exist_ok=True)
        results.write_csv(os.path.join(args.out, "samples.csv"), os.path.join(args.out, "summary.csv"))
        report.write(results, plan, args.out)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench: must run as root (network namespaces, iptables)")
    if not os.access(args.sluice, os.X_OK):
        raise SystemExit(f"bench: sluice binary {args.sluice} not found: build it first (make bench does)")
    for tool in ("ip", "iptables-restore"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} not found (make deps)")
    plan = Plan(args.plan or "smoke")
    ctx = Context(args, plan)
    os.makedirs(ctx.tmp, exist_ok=True)
    netns.install_cleanup()
    ctx.netbench = args.netbench or build_netbench(ctx)
    if args.cases:
        keep = set(args.cases.split(","))
        tag = lambda c: f"{c.s}x{c.e}" + ("" if c.mix == "clusterip" else c.mix)
        plan.cases = [c for c in plan.cases if tag(c) in keep]
        if hasattr(plan, "mode_cases"):
            plan.mode_cases = {m: [c for c in cs if tag(c) in keep] for m, cs in plan.mode_cases.items()}
        plan.uml_cases = [c for c in plan.uml_cases if tag(c) in keep]
        plan.ipvs_baseline_scales = [sc for sc in plan.ipvs_baseline_scales if f"{sc[0]}x{sc[1]}" in keep]
    help_text = subprocess.run([ctx.sluice, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    ctx.sluice_modes = modes_mod.listed_modes(help_text)

    wanted = [m for m in args.modes.split(",") if m]
    for m in wanted:
        if m not in modes_mod.ALL:
            raise SystemExit(f"bench: unknown mode {m!r} (known: {', '.join(modes_mod.ALL)})")

    if args.worker == "uml":
        ctx.results.info["uml_guest"] = {"kernel": platform.release(), "iptables": machine_info(ctx)["iptables"]}
        # The kernel tools first: they do not depend on Sluice's IPVS mode working.
        from sluicebench import ipvs_baseline
        ipvs_baseline.run(ctx, plan.ipvs_baseline_scales)
        ctx.results.save(args.results_json)
        for m in wanted:
            mode = modes_mod.ALL[m]
            reason = mode.unavailable(ctx)
            if reason:
                ctx.results.skipped[m] = reason
                continue
            for case in plan.uml_cases:
                _run_one(ctx, mode, case)
                ctx.results.save(args.results_json)
        ctx.results.save(args.results_json)
        return 0

    ctx.results.info.update(machine_info(ctx))
    ctx.results.info["plan"] = plan.name
    ctx.log(f"plan {plan.name}; sluice {ctx.sluice} ({', '.join(sorted(ctx.sluice_modes))} listed); out {ctx.out}")
    uml_needed = False
    for m in wanted:
        mode = modes_mod.ALL[m]
        if mode.in_uml:
            uml_needed = True
            continue
        reason = mode.unavailable(ctx)
        if reason:
            ctx.results.skipped[m] = reason
            ctx.log(f"{m}: not measured: {reason}")
            continue
        for case in plan.cases_for(m):
            _run_one(ctx, mode, case)
    if uml_needed:
        reason = ctx.uml_unavailable()
        if reason:
            ctx.results.skipped["ipvs"] = reason
            ctx.log(f"ipvs: not measured: {reason}")
        else:
            run_uml(ctx, args)
    ctx.results.info["wall_s"] = time.monotonic() - ctx.started
    ctx.results.info["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    os.makedirs(ctx.out, exist_ok=True)
    ctx.results.save(os.path.join(ctx.tmp, "results.json"))
    ctx.results.write_csv(os.path.join(ctx.out, "samples.csv"), os.path.join(ctx.out, "summary.csv"))
    report.write(ctx.results, plan, ctx.out)
    ctx.log(f"report: {os.path.join(ctx.out, 'report.md')}")
    for problem in check_complete(ctx.results, plan, wanted, strict=args.strict):
        ctx.results.failures.append(({}, problem))
    if ctx.results.failures:
        for tags, msg in ctx.results.failures:
            print(f"bench: FAILED {tags}: {msg[:3000]}", file=sys.stderr)
        return 1
    return 0


# What every measured case must have produced (scenario, metric); a missing one means the
# harness or the proxy broke somewhere, even if no exception said so.
REQUIRED = [("cold", "e2e_s"), ("cold", "sync_s"), ("cold", "rss_bytes"), ("add", "e2e_s"), ("add", "sync_s"),
            ("delete", "e2e_s"), ("change", "e2e_s"), ("churn", "e2e_s"), ("final", "sync_failures")]
DATAPATH = ["datapath-clusterip", "datapath-clusterip-last", "datapath-direct"]


def check_complete(results, plan, wanted, strict):
    """Problems with a finished run: a wanted mode not measured (only with --strict, which CI
    uses: there every mode must run), a case without one of the REQUIRED numbers, a data-path
    target that completed no request, or a proxy that reported failed syncs."""
    problems = []
    seen = {}
    for (mode, s, e, mix, scenario, metric), stats in results.summary().items():
        seen.setdefault((mode, s, e, mix), {})[(scenario, metric)] = stats
    for m in wanted:
        if m in results.skipped:
            if strict:
                problems.append(f"{m} was not measured: {results.skipped[m]}")
            continue
        cases = plan.uml_cases if modes_mod.ALL[m].in_uml else plan.cases_for(m)
        for c in cases:
            got = seen.get((m, c.s, c.e, c.mix))
            name = f"{m} {c.s}x{c.e} {c.mix}"
            if got is None:
                problems.append(f"{name}: no numbers at all")
                continue
            grown = modes_mod.ALL[m].grows(c)     # its start is "grow-start", not "cold"
            for key in REQUIRED:
                if grown and key[0] == "cold":
                    key = ("grow-start", key[1])
                if key not in got:
                    problems.append(f"{name}: no {key[0]} {key[1]}")
            failures = got.get(("final", "sync_failures"))
            if failures and failures["max"] > 0:
                problems.append(f"{name}: the proxy reported {failures['max']:.0f} failed syncs")
            if c.datapath:
                for t in DATAPATH:
                    rps = got.get((t, "rps"))
                    if not (rps and rps["min"] > 0):
                        problems.append(f"{name}: {t} completed no request")
    return problems


def _run_one(ctx, mode, case):
    try:
        run.run_case(ctx, mode, case)
    except Exception as e:      # one failed case must not lose the others' numbers
        import traceback
        traceback.print_exc()
        ctx.results.failures.append(({"mode": mode.key, "S": case.s, "E": case.e, "mix": case.mix}, str(e)))
        netns.cleanup()


if __name__ == "__main__":
    sys.exit(main())
