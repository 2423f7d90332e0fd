#!/usr/bin/env python3
"""Soak: a long run of endpoint churn against one sluice, sampling its memory, descriptors
and sync latency, to show whether they level off.

    sudo python3 benchmarks/soak.py --sluice .build-release/release/sluice [--duration 1800]
         [--services 500] [--endpoints 2] [--churn-interval 0.1] [--sample-interval 10]
         [--out benchmarks/results/soak]

One network namespace (a veth pair inside it carries the node IP); sluice runs in iptables mode on a
manifest directory of S Services, one file each (Service and EndpointSlice). Every
`--churn-interval` seconds one Service's file is replaced (write to a hidden temporary file,
then rename) with its first endpoint moved to the other of two addresses, round-robin over
the Services. Every `--sample-interval` seconds: VmRSS, open descriptors (/proc/PID/fd), and
from /metrics the syncs since the previous sample and their mean duration
(kubeproxy_sync_proxy_rules_duration_seconds: difference of _sum over difference of _count).

Manifests and sluice's log go to /tmp/sluice-soak-PID/. Outputs in --out: samples.csv, report.md (start, end, peak, the RSS slope over each half of
the run) and soak.svg (three panels against time). Needs root; touches nothing outside the
namespace it creates, which is deleted on exit or Ctrl-C.
"""

import argparse
import csv
import json
import os
import statistics
import sys
import time
import urllib.request
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sluicebench import fixtures as fx  # noqa: E402
from sluicebench import netns  # noqa: E402
from sluicebench.proxy import parse_metrics  # noqa: E402

METRICS_PORT = 10249
HEALTHZ_PORT = 10256


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def scrape(ns, path):
    with netns.entered(ns):
        try:
            port = METRICS_PORT if path == "/metrics" else HEALTHZ_PORT
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except OSError as e:
            return None, str(e)


def write_atomically(path, text):
    d, name = os.path.split(path)
    tmp = os.path.join(d, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def slope_per_hour(points):
    """Least-squares slope of (seconds, value) points, in value per hour."""
    if len(points) < 3:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600


def panel(x0, y0, w, h, title, unit, points, color, fmt, clip=None):
    """One linear time-series panel: points [(minutes, value)]; values above `clip` are
    drawn at the top edge (their count is noted)."""
    out = [f'<text x="{x0}" y="{y0 - 8}" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    pts = [(x, y) for x, y in points if y is not None]
    if not pts:
        return out + [f'<text x="{x0 + w / 2}" y="{y0 + h / 2}" text-anchor="middle">no data</text>']
    xmax = max(x for x, _ in pts) or 1
    clipped = sum(1 for _, y in pts if clip is not None and y > clip)
    if clip is not None:
        pts = [(x, min(y, clip)) for x, y in pts]
    ymin, ymax = min(y for _, y in pts), max(y for _, y in pts)
    lo = 0 if ymin >= 0 else ymin
    hi = ymax * 1.1 if ymax > 0 else 1
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = y0 + h - (v - lo) / (hi - lo) * h
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{escape(fmt(v))}</text>')
    for i in range(6):
        m = xmax * i / 5
        x = x0 + m / xmax * w
        out.append(f'<text x="{x:.1f}" y="{y0 + h + 14}" text-anchor="middle" font-size="11">{m:.0f} min</text>')
    path = " ".join(f"{'M' if j == 0 else 'L'}{x0 + x / xmax * w:.1f},{y0 + h - (y - lo) / (hi - lo) * h:.1f}"
                    for j, (x, y) in enumerate(pts))
    out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
    out.append(f'<text x="{x0 + w + 8}" y="{y0 + 14}" font-size="11" fill="#555">{escape(unit)}</text>')
    if clipped:
        out.append(f'<text x="{x0 + w + 8}" y="{y0 + 30}" font-size="10" fill="#555">{clipped} above,</text>')
        out.append(f'<text x="{x0 + w + 8}" y="{y0 + 43}" font-size="10" fill="#555">drawn at top</text>')
    return out


def plot(rows, title):
    W, H = 820, 700
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica,Arial,sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="70" y="24" font-size="15" font-weight="bold">{escape(title)}</text>']
    t = [(r["elapsed_s"] / 60) for r in rows]
    out += panel(70, 60, 660, 160, "Resident memory (VmRSS)", "MiB",
                 list(zip(t, [r["rss_kib"] / 1024 if r["rss_kib"] else None for r in rows])), "#1f77b4", lambda v: f"{v:.0f}")
    out += panel(70, 270, 660, 160, "Open file descriptors", "count",
                 list(zip(t, [r["fds"] for r in rows])), "#2ca02c", lambda v: f"{v:.0f}")
    lat = sorted(r["sync_mean_ms"] for r in rows if r["sync_mean_ms"] is not None)
    clip = lat[int(len(lat) * 0.98)] if len(lat) >= 50 else None
    out += panel(70, 480, 660, 160, "Mean sync duration per sample window", "ms",
                 list(zip(t, [r["sync_mean_ms"] for r in rows])), "#d62728", lambda v: f"{v:.0f}", clip=clip)
    out.append("</svg>")
    return "\n".join(out)


def service_file(i, endpoints, generation):
    return fx.service_yaml(i, endpoints, "clusterip", generation)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sluice", help="the sluice binary (required unless --report-only)")
    ap.add_argument("--duration", type=float, default=1800)
    ap.add_argument("--services", type=int, default=500)
    ap.add_argument("--endpoints", type=int, default=2)
    ap.add_argument("--churn-interval", type=float, default=0.1)
    ap.add_argument("--sample-interval", type=float, default=10)
    ap.add_argument("--out", default="benchmarks/results/soak")
    ap.add_argument("--report-only", action="store_true", help="write report.md and soak.svg again from --out's samples.csv and meta.json")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "meta.json")) as f:
            write_report(args.out, read_rows(args.out), json.load(f))
        return
    if not args.sluice:
        ap.error("--sluice is required")
    if os.geteuid() != 0:
        sys.exit("soak.py needs root (a network namespace and iptables)")
    sluice = os.path.abspath(args.sluice)
    os.makedirs(args.out, exist_ok=True)
    # Manifests and the sluice log stay outside the committed results.
    tmp = f"/tmp/sluice-soak-{os.getpid()}"
    manifests = os.path.join(tmp, "manifests")
    os.makedirs(manifests, exist_ok=True)
    for f in os.listdir(manifests):
        os.unlink(os.path.join(manifests, f))
    netns.install_cleanup()

    ns = netns.Namespace("soak")
    # A veth pair inside the namespace carries the node IP (no dummy module needed).
    ns.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"])
    ns.run(["ip", "addr", "add", f"{fx.NODE_IP}/24", "dev", "d0"])
    ns.run(["ip", "link", "set", "d0", "up"])
    ns.run(["ip", "link", "set", "d1", "up"])
    generation = [0] * args.services
    for i in range(args.services):
        write_atomically(os.path.join(manifests, f"svc-{i:05d}.yaml"), service_file(i, args.endpoints, 0))

    log_path = os.path.join(tmp, "sluice.log")
    cmd = [sluice, "--proxy-mode", "iptables", "--manifests", manifests, "--hostname-override", fx.NODE_NAME,
           "--node-ip", fx.NODE_IP, "--cluster-cidr", fx.CLUSTER_CIDR,
           "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}", "--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}"]
    proc = netns.start(ns.cmd(cmd), log_path=log_path)
    pid = proc.pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, text = scrape(ns, "/metrics")
        if status == 200 and parse_metrics(text).get("kubeproxy_sync_proxy_rules_duration_seconds_count", 0) >= 1:
            break
        if proc.poll() is not None:
            sys.exit(f"sluice exited ({proc.returncode}); log {log_path}")
        time.sleep(0.2)
    else:
        sys.exit(f"sluice did not sync within 60 s; log {log_path}")

    rows = []
    start = time.monotonic()
    next_churn = start
    next_sample = start
    churns = 0
    prev_count = prev_sum = None
    print(f"soak: {args.services} Services, one endpoint change every {args.churn_interval} s, "
          f"{args.duration:.0f} s, sample every {args.sample_interval} s", flush=True)
    try:
        while True:
            now = time.monotonic()
            if now - start >= args.duration:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"sluice exited ({proc.returncode}) during the soak; log {log_path}")
            if now >= next_sample:
                status, text = scrape(ns, "/metrics")
                m = parse_metrics(text) if status == 200 else {}
                count = m.get("kubeproxy_sync_proxy_rules_duration_seconds_count")
                total = m.get("kubeproxy_sync_proxy_rules_duration_seconds_sum")
                syncs = mean_ms = None
                if count is not None and prev_count is not None and count > prev_count:
                    syncs = count - prev_count
                    mean_ms = (total - prev_sum) / syncs * 1000
                if count is not None:
                    prev_count, prev_sum = count, total
                hz, _ = scrape(ns, "/healthz")
                row = {"elapsed_s": round(now - start, 1), "rss_kib": status_kib(pid, "VmRSS"), "hwm_kib": status_kib(pid, "VmHWM"),
                       "fds": open_fds(pid), "syncs": syncs, "sync_mean_ms": round(mean_ms, 3) if mean_ms is not None else None,
                       "churns": churns, "healthz": hz}
                rows.append(row)
                print(f"  t={row['elapsed_s']:7.0f}s rss={row['rss_kib'] / 1024:.1f} MiB fds={row['fds']} "
                      f"syncs={syncs} mean={row['sync_mean_ms']} ms healthz={hz}", flush=True)
                next_sample += args.sample_interval
            if now >= next_churn:
                i = churns % args.services
                generation[i] ^= 1
                write_atomically(os.path.join(manifests, f"svc-{i:05d}.yaml"), service_file(i, args.endpoints, generation[i]))
                churns += 1
                next_churn += args.churn_interval
            time.sleep(max(0.0, min(next_churn, next_sample) - time.monotonic()))
    finally:
        netns.stop(proc, timeout=20)

    with open(os.path.join(args.out, "samples.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    meta = {"sluice": sluice, "services": args.services, "churn_interval": args.churn_interval, "duration": args.duration,
            "sample_interval": args.sample_interval, "churns": churns,
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    write_report(args.out, rows, meta)


def read_rows(out):
    def num(v):
        if v in ("", "None", None):
            return None
        return float(v) if "." in v else int(v)
    with open(os.path.join(out, "samples.csv")) as f:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_report(out, rows, meta):
    sluice, churns = meta["sluice"], meta["churns"]
    rss = [(r["elapsed_s"], r["rss_kib"] / 1024) for r in rows if r["rss_kib"]]
    half = len(rss) // 2
    first, second = slope_per_hour(rss[:half]), slope_per_hour(rss[half:])
    fds = [r["fds"] for r in rows if r["fds"] is not None]
    lat = [r["sync_mean_ms"] for r in rows if r["sync_mean_ms"] is not None]
    fmt = lambda v: "n/a" if v is None else f"{v:+.1f}"  # noqa: E731
    span = f"{meta['duration'] / 60:.0f} min" if meta["duration"] >= 120 else f"{meta['duration']:.0f} s"
    title = f"Soak: {meta['services']} Services, 1 endpoint change / {meta['churn_interval']:g} s, {span}"
    with open(os.path.join(out, "soak.svg"), "w") as f:
        f.write(plot(rows, title))
    report = [
        f"# {title}",
        "",
        f"sluice `{sluice}`; {churns} endpoint changes; {len(rows)} samples every {meta['sample_interval']:g} s"
        + (f"; MALLOC_ARENA_MAX={meta['malloc_arena_max']} in its environment" if meta.get("malloc_arena_max") else "") + ".",
        "",
        meta.get("note", ""),
        "",
        "| | first sample | last sample | peak |",
        "|---|---|---|---|",
        f"| RSS (MiB) | {rss[0][1]:.1f} | {rss[-1][1]:.1f} | {max(v for _, v in rss):.1f} |",
        f"| open descriptors | {fds[0]} | {fds[-1]} | {max(fds)} |",
        f"| mean sync duration per window (ms) | {lat[0] if lat else 'n/a'} | {lat[-1] if lat else 'n/a'} | {max(lat) if lat else 'n/a'} |",
        "",
        f"RSS slope (least squares): first half {fmt(first)} MiB/h, second half {fmt(second)} MiB/h.",
        f"Median mean-sync duration: {statistics.median(lat):.2f} ms." if lat else "",
        f"/healthz answered 200 in {sum(1 for r in rows if r['healthz'] == 200)} of {len(rows)} samples.",
        "",
        "![soak](soak.svg)",
        "",
    ]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
