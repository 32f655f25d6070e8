"""slimkern.paradis: the tables and run folders of `slimkern paradis baselines|ablation|figure4`.

Job results are planted in the cache by hand (so nothing trains here); the tables must carry
exactly those numbers: means and sample stds checked against statistics computed by hand, the
US switch paired by MACs checked against slimkern.profile's closed forms, one short real job.
"""
import json
import math
import os

import pytest

from slimkern.paradis import cli as pcli
from slimkern.paradis import jobs as J
from slimkern.paradis import tables as Tb
from slimkern.paradis.seeds import parse_seeds, summarize


def _costs():
    from slimkern import models, runner
    from slimkern.evaluate import switch_cost

    net = models.build("mobilenet_v1", num_classes=10, in_channels=3, max_width=1.2, width_mult=0.5)
    size = J.BASE["image_size"]
    return lambda s: switch_cost(net, runner.parse_switch(s), (1, 3, size, size))


def _plant(cache, seeds, epochs, jobs, acc):
    """acc(job, switch, seed) -> top-1 fraction; costs from the closed forms."""
    cost = _costs()
    for job in jobs:
        trained = set(J.JOBS[job].get("switches", []))
        for s in seeds:
            rows = []
            for sw in J.eval_switches(job):
                macs, dev, params, _ = cost(sw)
                from slimkern import runner

                name = str(runner.parse_switch(sw))
                rows.append({"switch": name, "top1": acc(job, name, s), "macs": macs, "max_device_macs": dev,
                             "params": params, "trained": sw in trained or name in {str(runner.parse_switch(t))
                                                                                    for t in trained},
                             "branches": name.count(",") + 1})
            with open(os.path.join(cache, f"{job}-e{epochs}-s{s}.json"), "w") as fh:
                json.dump({"rows": rows}, fh)


def _acc(job, switch, seed):
    return 0.9 + 0.01 * seed + 0.001 * (len(job) % 7) + 0.0001 * len(switch)


@pytest.mark.parametrize("what", ["baselines", "ablation", "figure4"])
def test_run_folder_from_planted_jobs(tmp_path, what):
    cache = tmp_path / "cache"
    cache.mkdir()
    _plant(str(cache), [0, 1, 2], 3, pcli.WHAT[what], _acc)
    out = tmp_path / what
    rep = pcli.run(what, [0, 1, 2], 3, str(out), str(cache), echo=lambda *_: None)
    for f in ("report.json", "table.csv", "table.md", "plot.png"):
        assert (out / f).stat().st_size > 0, f
    assert not list(out.glob(".tmp-*"))
    with open(out / "report.json") as fh:
        assert json.load(fh)["meta"]["seeds"] == [0, 1, 2]
    # Every mean and std is the hand-computed one of the planted values (seeds 0,1,2 -> +0, +1, +2 points).
    stats = []
    if what == "baselines":
        row = rep["rows"][1]
        assert row["paradis_switch"] == "[0.5, 0.5]x" and row["us_switch"] == "[0.71875]x"
        stats = [(row["paradis"], "paradis", "[0.5, 0.5]x"), (row["us"], "us", "[0.71875]x"),
                 (row["individual"], "indiv-0.5,0.5", "[0.5, 0.5]x")]
    elif what == "ablation":
        stats = [(r["[4x0.25]x"], r["job"], "[0.25, 0.25, 0.25, 0.25]x") for r in rep["rows"]]
    else:
        series = {r["series"] for r in rep["rows"]}
        assert series == {"shared", "distributed", "individual", "us"}
        stats = [(r, {"shared": "paradis", "distributed": "paradis", "us": "us"}.get(
            r["series"], Tb.indiv_job(r["switch"])), r["switch"]) for r in rep["rows"]]
    assert stats
    for st, job, sw in stats:
        from slimkern.runner import parse_switch

        vals = [100 * _acc(job, str(parse_switch(sw)), s) for s in (0, 1, 2)]  # planted under one spelling
        m = sum(vals) / 3
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 2)
        assert st["mean"] == pytest.approx(m) and st["std"] == pytest.approx(sd), (job, sw)


def test_matched_widths_are_the_closest_macs():
    cost = _costs()
    got = J.matched_us_widths()
    for sw, w in got.items():
        target = cost(sw)[0]
        best = min((abs(cost(f"[{k / 32}]x")[0] - target), k / 32) for k in range(8, 33))
        assert w == best[1], sw
    assert got["[0.5, 0.5]x"] == pytest.approx(0.71875)  # the paper pairs [0.5,0.5] with US 0.725x


def test_seeds_summary_and_parsing():
    from slimkern.report import Report, SwitchResult

    def rep(a, b):
        return Report([SwitchResult("[1.0]x", a, 10, 10, 5, 5, True), SwitchResult("[1.0]x", b, 10, 10, 5, 5, True,
                                                                                    kind="individual")])

    rows = summarize({0: rep(0.90, 0.80), 1: rep(0.94, 0.84), 2: rep(0.92, 0.85)})
    assert [(r["switch"], r["kind"]) for r in rows] == [("[1.0]x", "shared"), ("[1.0]x", "individual")]
    assert rows[0]["top1_mean"] == pytest.approx(0.92) and rows[0]["top1_std"] == pytest.approx(0.02)
    assert rows[1]["top1_min"] == pytest.approx(0.80)
    assert parse_seeds(["0,1", "3"]) == [0, 1, 3] and parse_seeds("2") == [2]
    with pytest.raises(ValueError, match="duplicates"):
        parse_seeds("1,1")
    with pytest.raises(ValueError, match="integers"):
        parse_seeds("a")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown job"):
        J.run_job("nope", 0, 1, str(tmp_path))
    with pytest.raises(ValueError, match="epochs"):
        J.run_job("paradis", 0, 0, str(tmp_path))
    with pytest.raises(ValueError, match="unknown experiment"):
        pcli.run("table9", [0], 1, str(tmp_path), str(tmp_path))


@pytest.mark.slow
def test_one_real_job_is_cached(tmp_path):
    """The individual [4x0.25] job for two epochs (the first is the warm-up): trains, evaluates,
    caches; the second call reads the cache."""
    import torch

    torch.set_num_threads(1)
    rows = J.run_job("indiv-4x0.25", 0, 2, str(tmp_path))
    assert len(rows) == 1 and rows[0]["switch"] == "[0.25, 0.25, 0.25, 0.25]x" and rows[0]["branches"] == 4
    assert rows[0]["top1"] > 0.2  # above chance (0.1) after one epoch at full lr
    assert J.run_job("indiv-4x0.25", 0, 2, str(tmp_path)) == rows
