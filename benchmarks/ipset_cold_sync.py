#!/usr/bin/env python3
"""The IPVS mode's cold ipset sync at S Services: `ipset-probe` (Sources/IPSetProbe) run R
times, each in a fresh network namespace of the host (its kernel needs ip_set; inside
user-mode Linux run it through scripts/uml-run.sh). Prints each run and the median of each
step, in milliseconds.

    sudo python3 benchmarks/ipset_cold_sync.py [--probe .build/debug/ipset-probe] [--services 20000] [--reps 5]
"""

import argparse
import json
import os
import statistics
import subprocess


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", default=".build/debug/ipset-probe")
    ap.add_argument("--services", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    runs = []
    for r in range(a.reps):
        ns = f"sbench-ipset-{os.getpid()}-{r}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            out = subprocess.run(["ip", "netns", "exec", ns, a.probe, "--services", str(a.services)],
                                 check=True, capture_output=True, text=True).stdout
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        runs.append(json.loads(out))
        print(out.strip(), flush=True)
    keys = [k for k in runs[0] if k.endswith("_ms")]  # wall (_ms) and CPU (_cpu_ms) times
    summary = {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}
    print(json.dumps({"services": a.services, "entries": runs[0]["entries"], "reps": a.reps, "median_ms": summary}))


if __name__ == "__main__":
    main()
