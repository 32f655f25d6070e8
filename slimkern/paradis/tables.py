"""The ParaDiS paper's comparisons as tables over seeds (mean ± sample std of top-1, in %).

- :func:`baselines_table` -- Tables 3-5: each ParaDiS switch next to the universally slimmable
  switch of the closest total MACs (US-Nets with and without the wide teacher), the closest
  fixed-width slimmable width and the individual model of the same structure;
- :func:`ablation_table` -- Table 1: No KD, IPKD, Wide IPKD, Wide IPKD-A (beta 0.1 and 1) per switch;
- :func:`figure4_points` -- the points of Figure 4 (right).

Inputs are ``{job: {seed: rows}}`` from :func:`slimkern.paradis.jobs.run_jobs`.
"""
from __future__ import annotations

import statistics

from slimkern.paradis.jobs import SMALL, UNTRAINED, matched_us_widths

ABLATION = [("No KD", "paradis-nokd"), ("IPKD from [1.0]", "paradis-ipkd"), ("Wide IPKD", "paradis-wide-ipkd"),
            ("Wide IPKD-A, beta 0.1", "paradis-b0.1"), ("Wide IPKD-A, beta 1", "paradis")]


def _canon(switch: str) -> str:
    """One spelling per switch ("[4x0.25]x" and "[0.25, 0.25, 0.25, 0.25]x", "[1]x" and "[1.0]x")."""
    from slimkern.runner import parse_switch

    return str(parse_switch(switch))


def indiv_job(switch: str) -> str:
    return "indiv-" + switch.strip("[]x").replace(" ", "")


def stat(by_seed: dict, switch: str) -> dict | None:
    """Mean, sample std (0 for one seed), per-seed top-1 (in %) and the costs of ``switch`` over
    the seeds of one job; None when a seed lacks the switch."""
    want = _canon(switch)
    vals, row = [], None
    for s in sorted(by_seed):
        hit = [r for r in by_seed[s] if _canon(r["switch"]) == want]
        if not hit:
            return None
        row = hit[0]
        vals.append(100.0 * row["top1"])
    if not vals:
        return None
    return {"switch": switch, "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "per_seed": vals, "macs": row["macs"], "max_device_macs": row["max_device_macs"],
            "params": row["params"], "trained": row["trained"], "branches": row["branches"]}


def fmt(st: dict | None) -> str:
    return "—" if st is None else f"{st['mean']:.2f} ± {st['std']:.2f}"


def _closest(by_seed: dict, macs: int) -> str:
    first = by_seed[min(by_seed)]
    return min(first, key=lambda r: (abs(r["macs"] - macs), r["macs"]))["switch"]


def baselines_table(res: dict) -> list[dict]:
    matched = matched_us_widths()
    rows = []
    for sw in SMALL + UNTRAINED:
        p = stat(res["paradis"], sw)
        us_sw = f"[{matched[sw]:g}]x"
        row = {"paradis_switch": sw, "trained": p["trained"], "macs": p["macs"], "max_device_macs": p["max_device_macs"],
               "paradis": p, "us_switch": us_sw, "us": stat(res["us"], us_sw) if "us" in res else None,
               "us_wide": stat(res["us-wide"], us_sw) if "us-wide" in res else None}
        if "slimmable" in res:
            sl = _closest(res["slimmable"], p["macs"])
            row.update(slimmable_switch=sl, slimmable=stat(res["slimmable"], sl))
        ij = indiv_job(sw)
        row["individual"] = stat(res[ij], sw) if ij in res else None
        rows.append(row)
    return rows


def baselines_markdown(rows: list[dict]) -> str:
    out = ["| ParaDiS switch | MMAC (all / per device) | ParaDiS | US switch (closest MACs) | US IPKD | US Wide IPKD "
           "| slimmable (closest) | individual |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["trained"] else " (untrained)"
        us_macs = r["us"]["macs"] / 1e6 if r["us"] else r["us_wide"]["macs"] / 1e6 if r["us_wide"] else float("nan")
        sl = f"{r['slimmable_switch']} {fmt(r['slimmable'])}" if r.get("slimmable") else "—"
        out.append(f"| {r['paradis_switch']}{mark} | {r['macs'] / 1e6:.2f} / {r['max_device_macs'] / 1e6:.2f} "
                   f"| {fmt(r['paradis'])} | {r['us_switch']} ({us_macs:.2f} MMAC) | {fmt(r['us'])} "
                   f"| {fmt(r['us_wide'])} | {sl} | {fmt(r['individual'])} |")
    return "\n".join(out) + "\n"


def ablation_table(res: dict) -> list[dict]:
    rows = []
    for name, job in ABLATION:
        rows.append({"variant": name, "job": job, **{sw: stat(res[job], sw) for sw in SMALL + UNTRAINED}})
    return rows


def ablation_markdown(rows: list[dict]) -> str:
    cols = SMALL + UNTRAINED
    out = ["| variant | " + " | ".join(c + (" (untrained)" if c in UNTRAINED else "") for c in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        out.append(f"| {r['variant']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def figure4_points(res: dict) -> dict:
    """``shared``: ParaDiS switches at total MACs (trained and untrained), ``distributed``: the
    trained multi-device switches and [1.0] at MACs per device, ``individual``, ``us`` (the US
    curve over its evaluated widths <= 1.0)."""
    shared = [stat(res["paradis"], r["switch"]) for r in res["paradis"][min(res["paradis"])]]
    dist = [s for s in shared if _canon(s["switch"]) in {_canon(x) for x in SMALL}]
    indiv = [stat(res[indiv_job(sw)], sw) for sw in SMALL if indiv_job(sw) in res]
    us = sorted([stat(res["us"], r["switch"]) for r in res["us"][min(res["us"])]], key=lambda s: s["macs"]) \
        if "us" in res else []
    return {"shared": shared, "distributed": dist, "individual": indiv, "us": us}
