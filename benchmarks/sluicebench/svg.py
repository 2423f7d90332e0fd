"""Plain SVG charts (no plotting library on the machine): log-log lines with min/max
whiskers, and grouped bars. Output is deterministic for the same input."""

import math
from xml.sax.saxutils import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22"]

W, H = 760, 440
ML, MR, MT, MB = 78, 200, 40, 58


def _fmt_seconds(v):
    if v >= 1000:
        return f"{v / 60:.0f} min"
    if v >= 1:
        return f"{v:g} s"
    if v >= 1e-3:
        return f"{v * 1e3:g} ms"
    return f"{v * 1e6:g} µs"


def _fmt_count(v):
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _decades(lo, hi):
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    return a, b


def line_chart(title, xlabel, ylabel, series, yfmt=_fmt_seconds, xfmt=_fmt_count, note=None):
    """series: [{"name", "points": [(x, y, lo, hi)], "dash": bool}]; log-log axes."""
    pts = [(x, y, lo, hi) for s in series for (x, y, lo, hi) in s["points"] if y and y > 0 and x > 0]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="Helvetica,Arial,sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{ML}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text></svg>')
        return "\n".join(out)
    xs = [p[0] for p in pts]
    ys = [v for p in pts for v in (p[1], p[2] or p[1], p[3] or p[1]) if v and v > 0]
    xa, xb = _decades(min(xs), max(xs))
    ya, yb = _decades(min(ys), max(ys))
    pw, ph = W - ML - MR, H - MT - MB

    def X(x):
        return ML + (math.log10(x) - xa) / (xb - xa) * pw

    def Y(y):
        return MT + ph - (math.log10(y) - ya) / (yb - ya) * ph

    out.append(f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for d in range(xa, xb + 1):
        x = X(10 ** d)
        out.append(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{MT + ph}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{MT + ph + 16}" text-anchor="middle">{escape(xfmt(10 ** d))}</text>')
    for d in range(ya, yb + 1):
        y = Y(10 ** d)
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{ML + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(yfmt(10 ** d))}</text>')
    out.append(f'<text x="{ML + pw / 2}" y="{H - 18}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="16" y="{MT + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {MT + ph / 2})">{escape(ylabel)}</text>')
    ly = MT + 8
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if s.get("dash") else ""
        p = sorted((x, y, lo, hi) for (x, y, lo, hi) in s["points"] if y and y > 0 and x > 0)
        if p:
            path = " ".join(f"{'M' if j == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for j, (x, y, _, _) in enumerate(p))
            out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            for (x, y, lo, hi) in p:
                if lo and hi and lo > 0 and hi > 0 and hi > lo:
                    out.append(f'<line x1="{X(x):.1f}" y1="{Y(lo):.1f}" x2="{X(x):.1f}" y2="{Y(hi):.1f}" stroke="{color}"/>')
                marker = "rect" if s.get("dash") else "circle"
                if marker == "circle":
                    out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{color}"/>')
                else:
                    out.append(f'<rect x="{X(x) - 3.5:.1f}" y="{Y(y) - 3.5:.1f}" width="7" height="7" fill="{color}"/>')
        lx = ML + pw + 14
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 28}" y="{ly + 4}">{escape(s["name"])}</text>')
        ly += 18
    if note:
        for j, line in enumerate(note.split("\n")):
            out.append(f'<text x="{ML + pw + 14}" y="{ly + 14 + 15 * j}" font-size="10" fill="#555">{escape(line)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(title, ylabel, groups, bars, values, yfmt=lambda v: f"{v:g}"):
    """groups: x labels; bars: bar names per group; values[g][b] = (value or None)."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="Helvetica,Arial,sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{ML}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    vals = [v for g in values for v in g if v]
    if not vals:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text></svg>')
        return "\n".join(out)
    top = max(vals) * 1.1
    pw, ph = W - ML - MR, H - MT - MB
    out.append(f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    step = 10 ** math.floor(math.log10(top))
    if top / step < 3:
        step /= 2
    v = 0
    while v <= top:
        y = MT + ph - v / top * ph
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{ML + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(yfmt(v))}</text>')
        v += step
    gw = pw / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(bars))
    for gi, g in enumerate(groups):
        gx = ML + gi * gw + gw * 0.1
        for bi, b in enumerate(bars):
            val = values[gi][bi]
            if not val:
                continue
            h = val / top * ph
            color = PALETTE[bi % len(PALETTE)]
            out.append(f'<rect x="{gx + bi * bw:.1f}" y="{MT + ph - h:.1f}" width="{bw * 0.92:.1f}" height="{h:.1f}" fill="{color}"/>')
        out.append(f'<text x="{ML + gi * gw + gw / 2:.1f}" y="{MT + ph + 16}" text-anchor="middle">{escape(g)}</text>')
    out.append(f'<text x="16" y="{MT + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {MT + ph / 2})">{escape(ylabel)}</text>')
    ly = MT + 8
    for bi, b in enumerate(bars):
        color = PALETTE[bi % len(PALETTE)]
        lx = ML + pw + 14
        out.append(f'<rect x="{lx}" y="{ly - 6}" width="14" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 20}" y="{ly + 4}">{escape(b)}</text>')
        ly += 18
    out.append("</svg>")
    return "\n".join(out)
