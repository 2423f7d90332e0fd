#!/usr/bin/env python3
"""Start-up and peak memory of sluice by mode and object source (manifests, the API double).

    sudo python3 benchmarks/startup.py --sizes 1000,5000,10000,20000 --modes iptables-legacy,userspace \
        --sources manifests,api [--sluice PATH] [--out benchmarks/results]

Writes startup.md, startup.json and memory.svg to --out (benchmarks/results by default). See
sluicebench/startup.py for what is measured. The IPVS mode needs user-mode Linux and is not
part of this sweep.
"""

import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from sluicebench import modes as modes_mod  # noqa: E402
from sluicebench import netns, startup  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", default=os.path.join(REPO, ".build-release", "release", "sluice"))
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--modes", default="iptables-legacy,userspace")
    ap.add_argument("--sources", default="manifests,api")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tmp", default=os.path.join(REPO, "benchmarks", "results", "tmp", "startup"))
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between the first sync and the second RSS reading")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("startup: must run as root (network namespaces)")
    os.makedirs(args.tmp, exist_ok=True)
    netns.install_cleanup()
    cc = shutil.which("clang") or shutil.which("cc") or shutil.which("gcc")
    netbench = os.path.join(args.tmp, "netbench")
    if not os.path.exists(netbench):
        subprocess.run([cc, "-O2", "-pthread", "-o", netbench, os.path.join(HERE, "tools", "netbench.c")], check=True)
    rows = []
    for s in [int(x) for x in args.sizes.split(",") if x]:
        for m in [m for m in args.modes.split(",") if m]:
            mode = modes_mod.ALL[m]
            for source in [x for x in args.sources.split(",") if x]:
                print(f"startup: {m} {source} {s}x{args.endpoints}", flush=True)
                try:
                    row = startup.measure(args.sluice, netbench, mode, source, s, args.endpoints, args.tmp, settle=args.settle)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    row = {"mode": m, "source": source, "S": s, "E": args.endpoints, "error": str(e)}
                print(f"startup: {row}", flush=True)
                rows.append(row)
                startup.write_report(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
