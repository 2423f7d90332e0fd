"""Samples, their summary (median, min, max, n) and the CSV files."""

import csv
import json
import statistics

KEY = ("mode", "S", "E", "mix", "scenario", "metric")


class Results:
    def __init__(self):
        self.samples = []          # dicts: mode S E mix scenario metric rep value
        self.skipped = {}          # mode -> reason
        self.failures = []         # (tags, message)
        self.info = {}

    def recorder(self, tags):
        def rec(scenario, metric, value, rep=0):
            if value is None:
                return
            self.samples.append(dict(tags, scenario=scenario, metric=metric, rep=rep, value=float(value)))
        return rec

    def summary(self):
        groups = {}
        for s in self.samples:
            groups.setdefault(tuple(s[k] for k in KEY), []).append(s["value"])
        out = {}
        for k, vals in groups.items():
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        return out

    def write_csv(self, samples_path, summary_path):
        with open(samples_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(KEY) + ["rep", "value"])
            for s in self.samples:
                w.writerow([s[k] for k in KEY] + [s["rep"], _num(s["value"])])
        with open(summary_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(KEY) + ["median", "min", "max", "n"])
            for k, v in sorted(self.summary().items(), key=lambda kv: tuple(str(x).zfill(8) for x in kv[0])):
                w.writerow(list(k) + [_num(v["median"]), _num(v["min"]), _num(v["max"]), v["n"]])

    def to_json(self):
        return {"samples": self.samples, "skipped": self.skipped, "failures": self.failures, "info": self.info}

    def merge_json(self, d):
        self.samples += d.get("samples", [])
        self.skipped.update(d.get("skipped", {}))
        self.failures += d.get("failures", [])
        for k, v in d.get("info", {}).items():
            self.info.setdefault(k, v)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_json(), f)


def _num(v):
    return f"{v:.9g}"
