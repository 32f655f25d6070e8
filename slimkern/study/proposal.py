"""``slimkern study proposal``: the study the project's seed proposal asks for (issue 17).

Questions: (1) how to train a slimmable network federatedly; (2) does it beat the naive
choice, FedDF over distinct per-tier architectures, in accuracy and compute/memory; (3) can
optimal-transport fusion combine networks of different widths.

Setting: digits 8x8 (``load_digits_split``; a stratified server split of ``calib_fraction``
of the training data holds BN calibration, FedDF's unlabeled data (60%, augmented) and its
labelled validation split (40%)), ``clients`` clients in three tiers of different widths,
Dirichlet(alpha) label skew, ``small_cnn`` with ``channels`` at 1.0x; every method trains
the same clients with the same local recipe (SGD, momentum 0.9, wd 5e-4, cosine lr over
rounds) for the same rounds. Methods:

* ``distinct+feddf`` (i): a distinct model per tier (the tier's width), FedAvg per tier,
  FedDF of every tier's model from all clients' models (``slimkern.study.distinct``);
* ``heterofl``, ``paradis`` (ii): one shared slimmable net, sliced aggregation;
* ``heterofl+feddf``, ``paradis+feddf`` (iii): (ii) with FedDF as the server step (students:
  every tier's switch in one packed pass);
* ``otfusion`` (iv): clients train prefix sub-networks, the server aligns each reply to the
  global model by OT (rectangular plans) and averages in the aligned basis;
  ``otfusion-prefix``: each reply aligned to the global's own prefix (square plans), then
  the element-wise mean; ``prefix-avg``: the same clients and mean without any alignment
  (HeteroFL's formula with the otfusion rule's plain local recipe: no label split, Scaler or
  clipping, sample weights) -- the control for the alignment.

Per method and tier: top-1, server parameters stored, client training memory (one local step,
``slimkern.study.costs``), inference MACs, bytes per client per round, server compute per
round (multiply-adds of aggregation + FedDF; measured server-step seconds).
"""
from __future__ import annotations

import copy
import json
import os
import time

import torch

from slimkern.study.common import fmt, makedirs, mean_std, save_figure, write_csv, write_json

__all__ = ["PROPOSAL", "METHODS", "run_proposal", "run_one", "method_costs"]

METHODS = ("distinct+feddf", "heterofl", "paradis", "heterofl+feddf", "paradis+feddf", "otfusion", "otfusion-prefix",
           "prefix-avg")

PROPOSAL: dict = {
    "seeds": [0, 1, 2], "alphas": [0.1, 1.0], "methods": list(METHODS),
    "tiers": "full=1.0:0.3,half=0.5:0.4,quarter=0.25:0.3",
    "clients": 10, "rounds": 8, "local_epochs": 2, "lr": 0.2, "batch_size": 32, "channels": [32, 64, 16],
    "calib_fraction": 0.2, "distill_steps": 30, "distill_batch": 64, "distill_eval_every": 10,
    "distill_patience": 20, "eval_every": 2, "workers": 2, "out": "runs/study-proposal",
}


def _widths(cfg):
    from slimkern.fl.simulate import parse_tiers
    tiers = parse_tiers(cfg["tiers"])
    for t in tiers:
        if t.switch is None or t.switch.num_branches != 1 or t.switch.branches[0][0] != 0:
            raise ValueError(f"study proposal: tier {t.name!r} must be a one-branch prefix width like 0.5")
    return tiers


def _scaled(channels, p):
    return tuple(max(1, int(round(c * p))) for c in channels)


def _feddf(cfg, calib, seed):
    from slimkern.fl.augment import RandomAffine
    from slimkern.fl.feddf import FedDF
    Xc, Yc = calib
    n_unl = (len(Xc) * 3) // 5
    return FedDF(Xc[:n_unl], (Xc[n_unl:], Yc[n_unl:]), steps=cfg["distill_steps"], batch_size=cfg["distill_batch"],
                 eval_every=cfg["distill_eval_every"], patience=cfg["distill_patience"],
                 augment=RandomAffine(10.0, 1.0, 0.1, fill=float(Xc.min())), calibrate="both", seed=seed)


def _prefix_avg():
    from slimkern.fl.rules.heterofl import HeteroFL
    return HeteroFL(weighting="samples", label_split=False, scaler=False, clip_norm=None)


def run_one(method: str, alpha: float, seed: int, cfg: dict) -> dict:
    """One training run; returns its per-round curve and final per-tier numbers."""
    from slimkern.fl.demo import load_digits_split
    from slimkern.fl.models import small_cnn
    from slimkern.fl.simulate import make_clients, simulate
    from slimkern.study.distinct import run_distinct

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tiers = _widths(cfg)
    train, calib, test = load_digits_split(seed, cfg["calib_fraction"])
    clients = make_clients(train[1].numpy(), tiers, cfg["clients"], "dirichlet", alpha=alpha, seed=seed)
    n_tier = {t.name: sum(c.tier == t.name for c in clients) for t in tiers}
    common = dict(rounds=cfg["rounds"], local_epochs=cfg["local_epochs"], lr=cfg["lr"],
                  batch_size=cfg["batch_size"], seed=seed, eval_every=cfg["eval_every"])
    res = {"method": method, "alpha": alpha, "seed": seed, "clients_per_tier": n_tier}
    if method == "distinct+feddf":
        models = {t.name: small_cnn(10, 1, _scaled(cfg["channels"], t.switch.branches[0][1]), seed=seed) for t in tiers}
        h = run_distinct(models, clients, train, test, calib, feddf=_feddf(cfg, calib, seed), **common)
        rounds = h["rounds"]
        res["curve"] = [(r["round"], r["tier_accuracy"]) for r in rounds if r["tier_accuracy"]]
        res["bytes_per_client_round"] = {t: sum(r["bytes"][t] for r in rounds) / (len(rounds) * n_tier[t])
                                         for t in n_tier}
        res["server_seconds_per_round"] = sum(r["server_time"] for r in rounds) / len(rounds)
        res["server_macs_per_round"] = sum(r["server_macs"] for r in rounds) / len(rounds)
        res["aggregated_elements_per_round"] = sum(
            n_tier[t] * sum(p.numel() for p in models[t].parameters()) for t in n_tier)
    else:
        base = method.split("+")[0]
        rule = base
        if base.startswith("otfusion"):
            from slimkern.fl.rules.otfusion import OTFusion
            rule = OTFusion(mode="prefix" if base == "otfusion-prefix" else "full")
        elif base == "prefix-avg":
            rule = _prefix_avg()
        step = _feddf(cfg, calib, seed) if method.endswith("+feddf") else None
        net = small_cnn(10, 1, tuple(cfg["channels"]), seed=seed)
        h = simulate(net, train, test, clients, rule, calib_set=calib, lr_schedule="cosine", progress=False,
                     server_step=step, **common)
        R = len(h.rounds)
        res["curve"] = [(r.round, dict(r.tier_accuracy)) for r in h.rounds if r.tier_accuracy]
        tb = h.total_bytes()
        res["bytes_per_client_round"] = {
            t: (tb.get(t, {}).get("down", 0) + tb.get(t, {}).get("up", 0)) / (R * n_tier[t]) for t in n_tier}
        secs = [r.server_time for r in h.rounds]
        if base.startswith("otfusion"):
            secs = [a + b for a, b in zip(secs, rule.seconds)]
        res["server_seconds_per_round"] = sum(secs) / R
        res["server_macs_per_round"] = sum((r.metrics.get("feddf_server_macs", 0.0) or 0.0) for r in h.rounds) / R
        res["aggregated_elements_per_round"] = sum(sum(r.bytes_up.values()) for r in h.rounds) / R / 4
        res["server_metrics"] = [dict(r.metrics) for r in h.rounds]  # FedDF: teachers, steps, best step, scores
    res["top1"] = dict(res["curve"][-1][1])
    res["time_s"] = time.perf_counter() - t0
    return res


def method_costs(method: str, cfg: dict) -> dict:
    """Per tier: inference MACs and params, client training memory; and the server's stored params."""
    from slimkern.fl.client import client_aggregator
    from slimkern.fl.models import small_cnn
    from slimkern.fl.rules import get_rule
    from slimkern.study.costs import inference_cost, training_memory
    from slimkern.switch import Switch

    tiers = _widths(cfg)
    shape = (1, 8, 8)
    out = {"tiers": {}}
    if method == "distinct+feddf":
        stored = 0
        for t in tiers:
            m = small_cnn(10, 1, _scaled(cfg["channels"], t.switch.branches[0][1]))
            n = sum(p.numel() for p in m.parameters())
            stored += n
            macs, params = inference_cost(m, Switch([1.0]), shape)
            mem = training_memory(m, get_rule("fedavg"), Switch([1.0]), cfg["batch_size"], shape, n)
            out["tiers"][t.name] = {"switch": str(Switch([1.0])), "macs": macs, "params": params,
                                    "train_memory_bytes": mem}
        out["server_params"] = stored
        return out
    net = small_cnn(10, 1, tuple(cfg["channels"]))
    agg = client_aggregator(net)
    base = method.split("+")[0]
    rule = _prefix_avg() if base == "prefix-avg" else get_rule("otfusion" if base.startswith("otfusion") else base)
    all_sw = sorted({t.switch for t in tiers}, key=str)
    for t in tiers:
        sw = rule.client_switch(t.switch, all_sw)
        macs, params = inference_cost(net, rule.eval_switch(sw), shape)
        mem = training_memory(copy.deepcopy(net), rule, sw, cfg["batch_size"], shape, agg.num_elements(sw))
        out["tiers"][t.name] = {"switch": str(sw), "macs": macs, "params": params, "train_memory_bytes": mem}
    out["server_params"] = sum(p.numel() for p in net.parameters())
    return out


def _job(args):
    method, alpha, seed, cfg, path = args
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    res = run_one(method, alpha, seed, cfg)
    write_json(path, res)
    return res


def run_proposal(cfg: dict | None = None, log=print) -> dict:
    """Runs every (method, alpha, seed) job (``workers`` processes; finished jobs in
    ``out/runs/`` are reused), then writes ``report.json``, ``results.csv`` (per run and
    tier), ``summary.csv`` and ``table.md`` (mean ± std over seeds) and ``proposal.png``."""
    cfg = {**PROPOSAL, **(cfg or {})}
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"study proposal: unknown methods {bad}; choose from {list(METHODS)}")
    tiers = _widths(cfg)
    out = cfg["out"]
    makedirs(os.path.join(out, "runs"))
    write_json(os.path.join(out, "config.json"), cfg)
    t0 = time.perf_counter()
    jobs = [(m, a, s, cfg, os.path.join(out, "runs", f"{m}-alpha{a}-seed{s}.json"))
            for a in cfg["alphas"] for s in cfg["seeds"] for m in cfg["methods"]]
    results = []
    if cfg["workers"] > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(cfg["workers"]) as pool:
            for res in pool.imap_unordered(_job, jobs):
                results.append(res)
                log(f"{res['method']} alpha={res['alpha']} seed={res['seed']}: "
                    + ", ".join(f"{t} {100 * a:.1f}" for t, a in res["top1"].items()) + f" ({res['time_s']:.0f}s)")
    else:
        for j in jobs:
            res = _job(j)
            results.append(res)
            log(f"{res['method']} alpha={res['alpha']} seed={res['seed']}: "
                + ", ".join(f"{t} {100 * a:.1f}" for t, a in res["top1"].items()) + f" ({res['time_s']:.0f}s)")
    costs = {m: method_costs(m, cfg) for m in cfg["methods"]}
    rows, summary = [], []
    for res in results:
        for t in tiers:
            c = costs[res["method"]]["tiers"][t.name]
            rows.append({"method": res["method"], "alpha": res["alpha"], "seed": res["seed"], "tier": t.name,
                         "switch": c["switch"], "top1": res["top1"][t.name],
                         "bytes_per_client_round": res["bytes_per_client_round"][t.name],
                         "server_seconds_per_round": res["server_seconds_per_round"],
                         "server_macs_per_round": res["server_macs_per_round"]
                         + res["aggregated_elements_per_round"]})
    for a in cfg["alphas"]:
        for m in cfg["methods"]:
            for t in tiers:
                sel = [r for r in rows if r["method"] == m and r["alpha"] == a and r["tier"] == t.name]
                if not sel:
                    continue
                c = costs[m]["tiers"][t.name]
                acc = [r["top1"] for r in sel]
                summary.append({
                    "alpha": a, "method": m, "tier": t.name, "switch": c["switch"], "seeds": len(sel),
                    "top1_mean": mean_std(acc)[0], "top1_std": mean_std(acc)[1], "top1": fmt(acc),
                    "server_params": costs[m]["server_params"], "tier_params": c["params"],
                    "train_memory_KiB": c["train_memory_bytes"] / 1024, "inference_MACs": c["macs"],
                    "bytes_per_client_round": mean_std([r["bytes_per_client_round"] for r in sel])[0],
                    "server_MMACs_per_round": mean_std([r["server_macs_per_round"] for r in sel])[0] / 1e6,
                    "server_s_per_round": mean_std([r["server_seconds_per_round"] for r in sel])[0]})
    report = {"config": cfg, "costs": costs, "summary": summary, "runs": results,
              "time_s": time.perf_counter() - t0}
    write_json(os.path.join(out, "report.json"), report)
    write_csv(os.path.join(out, "results.csv"), rows)
    write_csv(os.path.join(out, "summary.csv"), summary)
    from slimkern.report import atomic_write_text
    atomic_write_text(os.path.join(out, "table.md"), table_markdown(summary))
    _plot(results, cfg, tiers, os.path.join(out, "proposal.png"))
    return report


def table_markdown(summary: list[dict]) -> str:
    head = ("| alpha | method | tier (switch) | top-1 % (mean ± std) | server params | tier params | "
            "client train mem KiB | inference MACs | bytes/client/round | server MMACs/round | server s/round |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['alpha']} | {r['method']} | {r['tier']} ({r['switch']}) | {r['top1']} | {r['server_params']} | "
             f"{r['tier_params']} | {r['train_memory_KiB']:.0f} | {r['inference_MACs']} | "
             f"{r['bytes_per_client_round']:.0f} | {r['server_MMACs_per_round']:.1f} | {r['server_s_per_round']:.2f} |"
             for r in summary]
    return head + "\n".join(lines) + "\n"


def _plot(results, cfg, tiers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = cfg["alphas"]
    fig, axes = plt.subplots(len(alphas), len(tiers), figsize=(4.2 * len(tiers), 3.4 * len(alphas)), squeeze=False,
                             sharey=True)
    colors = dict(zip(METHODS, ["tab:gray", "tab:orange", "tab:blue", "tab:red", "tab:purple", "tab:green",
                                "tab:olive", "tab:brown"]))
    for i, a in enumerate(alphas):
        for j, t in enumerate(tiers):
            ax = axes[i][j]
            for m in cfg["methods"]:
                runs = [r for r in results if r["method"] == m and r["alpha"] == a]
                if not runs:
                    continue
                xs = [p[0] + 1 for p in runs[0]["curve"]]
                ys = [[r["curve"][k][1][t.name] for r in runs] for k in range(len(xs))]
                mu = [100 * mean_std(v)[0] for v in ys]
                sd = [100 * mean_std(v)[1] for v in ys]
                ax.plot(xs, mu, "-o", ms=3, color=colors.get(m), label=m)
                ax.fill_between(xs, [u - s for u, s in zip(mu, sd)], [u + s for u, s in zip(mu, sd)],
                                color=colors.get(m), alpha=0.12)
            ax.set_title(f"alpha={a}, tier {t.name} ({t.switch})", fontsize=9)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("top-1 % (mean ± std, seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
