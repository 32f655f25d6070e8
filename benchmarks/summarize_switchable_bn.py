"""Ratios (per-block torch / slimkern, medians and minima) from benchmarks/results/switchable_bn.json."""
import json
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/switchable_bn.json"
rows = {}
for b in json.load(open(path))["benchmarks"]:
    e = b["extra_info"]
    rows.setdefault((e["shape"], e["table"]), {})[e["provider"]] = b["stats"]
print(f"{'shape':15s} {'table':22s} {'slimkern med':>12s} {'per-block med':>13s} {'ratio med':>9s} {'ratio min':>9s}")
meds = []
for (shape, table), p in rows.items():
    s, t = p["slimkern_cpp"], p["torch_per_block"]
    meds.append(t["median"] / s["median"])
    print(f"{shape:15s} {table:22s} {s['median'] * 1e3:10.3f}ms {t['median'] * 1e3:11.3f}ms "
          f"{t['median'] / s['median']:8.2f}x {t['min'] / s['min']:8.2f}x")
print(f"lowest median ratio {min(meds):.2f}x, geometric mean {__import__('math').prod(meds) ** (1 / len(meds)):.2f}x")
