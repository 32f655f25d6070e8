"""Mean and spread over seeds of a ``slimkern prune`` run, as Markdown tables (summary.md).

DAC (the paper's Figure 3 numbers): per budget and kind (DAC / width multiplier) the test
accuracy after clustered FedAvg, MACs, params and peak activation, the latter also as a
fraction of the 1.0x model's; the 1.0x model's FedAvg accuracy when it was run.
DWNP (the paper's Table 1 layout): per participant base accuracy (unpruned FedAvg), accuracy
after pruning, change, target / learned / final FLOPs ratio and the FLOPs reduction.
Spreads are sample standard deviations (n - 1); one seed prints no spread.
"""
from __future__ import annotations

import json
import statistics

__all__ = ["dac_summary", "dwnp_summary", "gate_summary", "sweep_summary"]


def _ms(xs, scale=1.0, digits=2) -> str:
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    return f"{m:.{digits}f}" if len(xs) < 2 else f"{m:.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def dac_summary(report: dict) -> str:
    runs = report["runs"]
    lines = [f"seeds: {[r['seed'] for r in runs]}", ""]
    full_fl = [r["full"]["fl_accuracy"][-1] for r in runs if r["full"].get("fl_accuracy")]
    full = runs[0]["full"]
    lines.append(f"1.0x model: {full['macs']:,} MACs, {full['params']:,} params, peak activation "
                 f"{full['peak_activation_bytes']:,} B; test accuracy after pre-training "
                 f"{_ms([r['full']['accuracy'] for r in runs], 100)} %, after FedAvg over all clients "
                 f"{_ms(full_fl, 100)} %")
    lines += ["", "| budget | model | accuracy % | MACs | params | peak activation B | peak / 1.0x |",
              "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((json.dumps(c["budget"], sort_keys=True), c["kind"]) for c in runs[0]["clusters"]))
    for bk, kind in keys:
        cs = [(r, c) for r in runs for c in r["clusters"] if json.dumps(c["budget"], sort_keys=True) == bk
              and c["kind"] == kind]
        name = "DAC" if kind == "dac" else f"width x{_ms([c['width'] for _, c in cs], 1, 3)}"
        lines.append(f"| {bk} | {name} | {_ms([c['final_accuracy'] for _, c in cs], 100)} | "
                     f"{_ms([c['macs'] for _, c in cs], 1, 0)} | {_ms([c['params'] for _, c in cs], 1, 0)} | "
                     f"{_ms([c['peak_activation_bytes'] for _, c in cs], 1, 0)} | "
                     f"{_ms([c['peak_activation_bytes'] / r['full']['peak_activation_bytes'] for r, c in cs], 1, 3)} |")
    return "\n".join(lines) + "\n"


def dwnp_summary(report: dict) -> str:
    runs = report["runs"]
    lines = [f"seeds: {[r['seed'] for r in runs]}", "",
             "| participant | base accuracy % | accuracy % | change (points) | target | learned ratio | final ratio "
             "| FLOPs reduction % |", "|---|---|---|---|---|---|---|---|"]
    n = len(runs[0]["devices"])
    for k in range(n + 1):
        ps = [(r, r["server"] if k == 0 else r["devices"][k - 1]) for r in runs]
        base = [r["base_accuracy"] for r, _ in ps]
        change = [(p["accuracy"] - r["base_accuracy"]) if r["base_accuracy"] is not None else None for r, p in ps]
        lines.append(f"| {'server' if k == 0 else f'device {k}'} | {_ms(base, 100)} | "
                     f"{_ms([p['accuracy'] for _, p in ps], 100)} | {_ms(change, 100)} | {ps[0][1]['target']:.3f} | "
                     f"{_ms([p['learned_ratio'] for _, p in ps], 1, 3)} | {_ms([p['ratio'] for _, p in ps], 1, 3)} | "
                     f"{_ms([1 - p['ratio'] for _, p in ps], 100, 1)} |")
    lines.append("")
    lines.append(f"shared weights, unmasked: {_ms([r['shared_accuracy'] for r in runs], 100)} %")
    return "\n".join(lines) + "\n"


def _model_label(row: dict) -> str:
    if row["model"] == "full":
        return "1.0x"
    b = ", ".join(f"{k}={v:g}" for k, v in sorted(row["budget"].items()))
    return f"{'DAC' if row['model'] == 'dac' else 'width'} {b}"


def sweep_summary(report: dict) -> str:
    """DAC client sweep (Figures 4-5): per scenario a table of accuracy (mean ± std over seeds)
    with one row per model and one column per number of clients, and the models' params."""
    runs = report["runs"]
    rows = [r for run in runs for r in run["rows"]]
    lines = [f"seeds: {[r['seed'] for r in runs]}", ""]
    clients = sorted({r["clients"] for r in rows})
    models = list(dict.fromkeys(_model_label(r) for r in rows))
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        srows = [r for r in rows if r["scenario"] == sc]
        cpc = {r["clients"]: r["classes_per_client"] for r in srows if r["classes_per_client"]}
        note = f" (classes per client: {', '.join(f'N={n}: {c}' for n, c in sorted(cpc.items()))})" if cpc else ""
        seeds = sorted({r["seed"] for r in srows})
        lines += [f"### {sc}: partition {srows[0]['partition']}, local epochs {srows[0]['local_epochs']}{note}; "
                  f"seeds {', '.join(map(str, seeds))}", "",
                  "| model | params | " + " | ".join(f"N={n} accuracy %" for n in clients) + " |",
                  "|---|---|" + "---|" * len(clients)]
        for m in models:
            mr = [r for r in srows if _model_label(r) == m]
            if not mr:
                continue
            cells = [_ms([r["accuracy"] for r in mr if r["clients"] == n], 100) for n in clients]
            lines.append(f"| {m} | {_ms([r['params'] for r in mr], 1, 0)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def gate_summary(report: dict) -> str:
    """DAC gate study: per gate learning rate, the channels removed by the threshold rule and by
    the guard, the smallest live gate at the end, and each budget's accuracy before FL."""
    runs = report["runs"]
    lines = [f"seeds: {[r['seed'] for r in runs]}; pre-trained accuracy "
             f"{_ms([r['pretrained_accuracy'] for r in runs], 100)} %", ""]
    budgets = [json.dumps(b["budget"], sort_keys=True) for b in runs[0]["runs"][0]["budgets"]]
    lines += ["| gate lr | rounds | rounds the threshold fired | channels by threshold | channels by guard "
              "| smallest live gate at the end | " + " | ".join(f"accuracy % {b}" for b in budgets) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(budgets)]
    for i, g in enumerate(r["gate_lr"] for r in runs[0]["runs"]):
        rs = [run["runs"][i] for run in runs]
        accs = [_ms([r["budgets"][j]["accuracy"] for r in rs], 100) for j in range(len(budgets))]
        lines.append(f"| {g:g} | {_ms([r['rounds'] for r in rs], 1, 1)} | {_ms([r['threshold_rounds'] for r in rs], 1, 1)}"
                     f" | {_ms([r['threshold_channels'] for r in rs], 1, 1)} | {_ms([r['guard_channels'] for r in rs], 1, 1)}"
                     f" | {_ms([r['final_gate_min'] for r in rs], 1, 3)} | " + " | ".join(accs) + " |")
    return "\n".join(lines) + "\n"
