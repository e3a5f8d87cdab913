"""`ds4cupy bench` reports: the median / min / max / spread of every metric over runs, as a table, as CSV and as the
Markdown table of BENCHMARKS.md (`ds4cupy bench --show REPORT.json --markdown` prints a saved report, so the numbers
in BENCHMARKS.md are copied from the JSON by a program, never typed)."""
from __future__ import annotations

import csv
import io
import statistics


# ---- summary and output -------------------------------------------------------------------------------------------
# (key, label, unit, scale) of every summarised metric; key is a path in a run dict
def metric_rows(runs: list[dict]) -> list[tuple[str, str, str, float]]:
    rows = [("load_s", "load", "s", 1.0), ("bandwidth.gbps", "device read bandwidth", "GB/s", 1.0),
            ("peak_gpu_mem_bytes", "peak GPU memory", "GiB", 1 / 2**30)]
    first = runs[0]
    for p in first.get("prefill", []):
        rows.append((f"pp{p['pp']}.tps", f"pp{p['pp']} prefill", "t/s", 1.0))
        rows.append((f"pp{p['pp']}.ttft_s", f"pp{p['pp']} TTFT", "s", 1.0))
    for d in first.get("decode", []):
        k = f"tg{d.get('requested', d['tokens'])}@d{d['depth']}"
        rows += [(f"{k}.steady_tps", f"{k} decode steady", "t/s", 1.0),
                 (f"{k}.avg_tps", f"{k} decode avg (incl. first)", "t/s", 1.0),
                 (f"{k}.ttft_s", f"{k} TTFT", "s", 1.0),
                 (f"{k}.bytes_per_token", f"{k} bytes read/token", "MB", 1e-6),
                 (f"{k}.host_ms_per_token", f"{k} host time/token (median)", "ms", 1.0),
                 (f"{k}.gbps", f"{k} achieved", "GB/s", 1.0),
                 (f"{k}.roofline_fraction", f"{k} roofline", "%", 100.0)]
    return rows


def metric_value(run: dict, key: str):
    if key.startswith("pp") and "." in key:
        name, field = key.split(".", 1)
        for p in run.get("prefill", []):
            if f"pp{p['pp']}" == name:
                return p.get(field)
        return None
    if key.startswith("tg") and "." in key:
        name, field = key.split(".", 1)
        for d in run.get("decode", []):
            if f"tg{d.get('requested', d['tokens'])}@d{d['depth']}" == name:
                return d.get(field)
        return None
    v = run
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key, label, unit, scale in metric_rows(runs):
        vals = [metric_value(r, key) for r in runs]
        vals = [float(v) for v in vals if v is not None]
        if not vals:
            out[key] = {"label": label, "unit": unit, "scale": scale, "n": 0, "median": None, "min": None,
                        "max": None, "spread_pct": None, "values": []}
            continue
        med = statistics.median(vals)
        out[key] = {"label": label, "unit": unit, "scale": scale, "n": len(vals), "median": med, "min": min(vals),
                    "max": max(vals), "spread_pct": (100.0 * (max(vals) - min(vals)) / med) if med else None,
                    "values": vals}
    return out


def _fmt(v, scale: float = 1.0) -> str:
    if v is None:
        return "-"
    x = v * scale
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}" if a >= 1e-3 else f"{x:.3g}"


def format_table(report: dict) -> str:
    m = report["meta"]
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    lines = [f"ds4cupy bench: {m['model']['name']}  |  {m['mode']} / {m['backend']}  |  {gpu}  |  "
             f"{m['settings']['runs']} run(s), page cache: {', '.join(sorted(set(m['page_cache']))) or '-'}",
             f"KV bytes per token (growing part): {_fmt(m['kv_bytes_per_token'])}  |  weight bytes read per decoded "
             f"token: {_fmt(m['weight_bytes_per_token'])}"]
    head = f"{'metric':<40}{'unit':>6}{'median':>12}{'min':>12}{'max':>12}{'spread':>9}"
    lines += [head, "-" * len(head)]
    for key, s in report["summary"].items():
        if s["n"] == 0:
            continue
        spread = "-" if s["spread_pct"] is None else f"{s['spread_pct']:.1f}%"
        lines.append(f"{s['label']:<40}{s['unit']:>6}{_fmt(s['median'], s['scale']):>12}"
                     f"{_fmt(s['min'], s['scale']):>12}{_fmt(s['max'], s['scale']):>12}{spread:>9}")
    return "\n".join(lines)


def format_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "label", "unit", "median", "min", "max", "spread_pct", "n", "values"])
    for key, s in report["summary"].items():
        sc = s["scale"]
        conv = (lambda v: None if v is None else v * sc)
        w.writerow([key, s["label"], s["unit"], conv(s["median"]), conv(s["min"]), conv(s["max"]), s["spread_pct"],
                    s["n"], " ".join(repr(v * sc) for v in s["values"])])
    return buf.getvalue()


def format_markdown(report: dict, match: str = "") -> str:
    """BENCHMARKS.md's table of a report: | metric | unit | median | min | max |, the metrics whose key contains
    `match` (all when empty)."""
    lines = ["| metric | unit | median | min | max |", "|---|---|---|---|---|"]
    for key, s in report["summary"].items():
        if s["n"] == 0 or match not in key:
            continue
        sc = s["scale"]
        lines.append(f"| {s['label']} | {s['unit']} | {_fmt(s['median'], sc)} | {_fmt(s['min'], sc)} | "
                     f"{_fmt(s['max'], sc)} |")
    return "\n".join(lines)

