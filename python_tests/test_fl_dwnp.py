"""``slimkern fl --strategy dwnp`` (slimkern.fl.dwnp) against independent references.

* the command equals ``slimkern.prune.dwnp_federated`` called directly on the same clients
  with the targets computed by hand (MACs of SmallCNN written out, not ``slimkern.profile``);
* every delivered device model, rebuilt from the run folder (kept channels + saved weights),
  has MACs counted by hand from its plain layers within +-5 % of its target;
* a NaN reply is rejected and the round's weights are the hand mean of the other replies;
* a resumed run equals the uninterrupted one; argument errors are one line and exit code 2.
"""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Subset, TensorDataset

from slimkern.cli import main

CHANNELS = (32, 64, 12)
ARGS = ["fl", "--strategy", "dwnp", "--clients", "4", "--rounds", "2", "--partition", "iid",
        "--tiers", "big=0.75:0.5,phone={macs=100k}:0.5", "--no-progress",
        # not DWNP's defaults, so that the mapping of every option to dwnp_federated is observed
        "--lr", "0.08", "--batch-size", "24", "--lr-hn", "0.002", "--lam", "1.5", "--regularizer", "sq_log",
        "--calib-batches", "3"]


def conv_macs(c_in, c_out, k, hw):
    return c_out * c_in * k * k * hw * hw


def small_cnn_macs(c1, c2, c3, classes=10):
    """SmallCNN on 8x8 digits written out: 3x3 convs at 8x8 (stride 1), 4x4 (stride 2), 4x4,
    then the classifier; BN and ReLU cost no MACs in slimkern.profile's count."""
    return conv_macs(1, c1, 3, 8) + conv_macs(c1, c2, 3, 4) + conv_macs(c2, c3, 3, 4) + c3 * classes


FULL = small_cnn_macs(*CHANNELS)


def hand_targets(tiers):
    # [0.75]: channels round(0.75 C) = 24, 48, 9; {macs=100k}: 100000 / full
    per = {"big": small_cnn_macs(24, 48, 9) / FULL, "phone": 100_000 / FULL}
    return [per[t] for t in tiers]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dwnp") / "run")
    assert main(ARGS + ["--out", out]) == 0
    with open(os.path.join(out, "report.json")) as fh:
        return out, json.load(fh)


def _direct(seed=0, rounds=2):
    from slimkern.fl.demo import load_digits_split
    from slimkern.fl.models import small_cnn
    from slimkern.fl.simulate import make_clients, parse_tiers
    from slimkern.prune.dwnp_federated import dwnp_federated

    train, _, test = load_digits_split(seed, 0.1)
    clients = make_clients(train[1].numpy(), parse_tiers("big=0.75:0.5,phone={macs=100k}:0.5"), 4, "iid", seed=seed)
    targets = hand_targets([c.tier for c in clients])
    data = TensorDataset(*train)
    sets = [Subset(data, c.indices.tolist()) for c in clients]
    r = dwnp_federated(small_cnn(10, 1, CHANNELS, seed=seed), sets, TensorDataset(*test), input_size=(1, 1, 8, 8),
                       p_server=max(targets), p_devices=targets, rounds=rounds, local_epochs=1, lr_w=0.08,
                       momentum=0.9, lr_hn=0.002, lam=1.5, regularizer="sq_log", batch_size=24, project=True,
                       calibrate_batches=3, seed=seed)
    return r, clients, targets


def test_command_equals_dwnp_federated_called_directly(run):
    out, rep = run
    r, clients, targets = _direct()
    got = rep["runs"][0]
    assert got["base_accuracy"] == r.base_accuracy and got["shared_accuracy"] == r.shared_accuracy
    assert got["history"] == json.loads(json.dumps(r.history))
    for d, g, c, t in zip(r.devices, got["devices"], clients, targets):
        assert g["target"] == pytest.approx(t, rel=1e-12)
        assert (g["tier"], g["client"]) == (c.tier, c.id)
        assert (g["ratio"], g["macs"], g["accuracy"], g["learned_ratio"]) == (d.ratio, d.macs, d.accuracy,
                                                                              d.learned_ratio)
        assert {k: list(v) for k, v in g["keep"].items()} == d.keep
        saved = torch.load(os.path.join(out, "models", f"seed0_p{d.index}.pt"), weights_only=True)
        mine = d.model.state_dict()
        assert list(saved) == list(mine)
        assert all(torch.equal(saved[k], mine[k]) for k in mine if isinstance(mine[k], torch.Tensor))
    assert got["server"]["target"] == pytest.approx(max(targets), rel=1e-12)


def _hand_macs(model: nn.Module) -> int:
    """MACs of a plain model from its layers' shapes and the output sizes seen on one 8x8 digit."""
    total, hooks = [0], []

    def conv(m, _, y):
        total[0] += y[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin(m, _, y):
        total[0] += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8))
    for h in hooks:
        h.remove()
    return total[0]


def _fresh_net():
    from slimkern.fl.models import small_cnn
    net = small_cnn(10, 1, CHANNELS).train()
    net(torch.zeros(2, 1, 8, 8))  # BN rows of [1.0]x exist (the saved weights replace them)
    return net


def test_every_device_model_within_5_percent_of_its_target(run):
    from slimkern.prune import prune_channels

    out, rep = run
    got = rep["runs"][0]
    everything = {"c1": list(range(32)), "c2": list(range(64)), "c3": list(range(12))}
    assert _hand_macs(prune_channels(_fresh_net(), everything)) == FULL  # the hook count, checked
    for p in [got["server"]] + got["devices"]:
        keep = {g: list(v) for g, v in p["keep"].items()}
        model = prune_channels(_fresh_net(), keep)
        model.load_state_dict(torch.load(os.path.join(out, "models", f"seed0_p{p['index']}.pt"), weights_only=True))
        assert not any(type(m).__module__.startswith("slimkern") for m in model.modules())  # plain torch layers
        macs = _hand_macs(model)
        assert macs == p["macs"]
        assert abs(macs / (p["target"] * FULL) - 1) <= 0.05, (p["index"], macs, p["target"] * FULL)
        assert macs < FULL


def test_run_folder(run):
    out, rep = run
    names = {"config.json", "log.txt", "report.json", "devices.csv", "dwnp.png", "summary.md", "checkpoint-dwnp.pt",
             "models"}
    assert names <= set(os.listdir(out))
    assert sorted(os.listdir(os.path.join(out, "models"))) == [f"seed0_p{i}.pt" for i in range(5)]
    with open(os.path.join(out, "dwnp.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "devices.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["participant"] for r in rows] == ["server"] + [f"device {i}" for i in range(1, 5)]
    for r, d in zip(rows[1:], rep["runs"][0]["devices"]):
        assert float(r["flops_ratio"]) == pytest.approx(d["ratio"]) and float(r["target_ratio"]) == pytest.approx(
            d["target"])
    assert rep["meta"]["command"] == "slimkern fl --strategy dwnp" and rep["meta"]["targets_from"] == "tiers"
    with open(os.path.join(out, "config.json")) as fh:
        cfg = json.load(fh)
    assert (cfg["strategies"], cfg["clients"], cfg["rounds"]) == (["dwnp"], 4, 2)
    ck = torch.load(os.path.join(out, "checkpoint-dwnp.pt"), weights_only=True)
    assert ck["round"] == 2 and ck["method"] == "dwnp"
    assert "| device 4 |" in open(os.path.join(out, "summary.md")).read()


@pytest.mark.parametrize("extra, message", [
    (["--p-devices", "0.5", "0.4", "0.3"], "gives 3 targets for 4 clients"),
    (["--clients", "0"], "--clients must be an int >= 1"),
    (["--p-devices", "-0.2"], "must be in (0, 1]"),
    (["--p-devices", "half"], "must be FLOPs ratios"),
    (["--p-devices", "0.001"], "below the smallest reachable model"),
    (["--tiers", "tiny={macs=500}:1.0"], "below the smallest reachable model"),
    (["--tiers", "p={params=10k}:1.0"], "must be a FLOPs budget of one device"),
    (["--tiers", "pair=[0.5,0.5]:1.0"], "runs one pruned sub-network"),
    (["--tiers", "p={macs=-5}:1.0"], "macs"),
    (["--p-server", "0.3"], "exceeds the server's 0.3"),
    (["--lr-schedule", "cosine"], "--lr-schedule 'cosine' is not supported"),
    (["--aug-rotate", "10"], "without augmentation"),
    (["--clients-per-round", "2"], "--clients-per-round 2 is not supported"),
    (["--strategy", "dwnp", "fedavg"], "dwnp runs alone"),
    (["--lr-hn", "0"], "lr_hn must be a positive number"),
    (["--lam", "-1"], "lam must be a number >= 0"),
])
def test_argument_errors_are_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    args = ARGS + ["--out", str(out)] + extra
    if extra[0] == "--strategy":
        args = args[:1] + extra + args[3:]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing half-written is left behind


def test_config_file_and_explicit_device_targets(tmp_path, capsys):
    out = tmp_path / "run"
    conf = tmp_path / "dwnp.json"
    conf.write_text(json.dumps({"strategy": "dwnp", "clients": 4, "rounds": 1, "partition": "iid",
                                "p_devices": [0.5, 0.3, 0.5, 0.3], "label_split": False}))
    assert main(["fl", "--config", str(conf), "--out", str(out), "--no-progress"]) == 0
    assert f"report: {out / 'report.json'}" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["targets_from"] == "--p-devices" and rep["meta"]["ignored"] == ["label_split"]
    run = rep["runs"][0]
    assert [d["target"] for d in run["devices"]] == [0.5, 0.3, 0.5, 0.3] and run["server"]["target"] == 0.5
    assert all(abs(d["ratio"] / d["target"] - 1) <= 0.05 for d in run["devices"])


def test_get_rule_names_the_dwnp_entry():
    from slimkern.fl.rules import get_rule
    with pytest.raises(ValueError, match="run_fl_dwnp"):
        get_rule("dwnp")


def test_nan_reply_is_rejected_and_the_round_is_the_mean_of_the_others(tmp_path):
    from slimkern.fl.dwnp import run_fl_dwnp

    seen = {}

    def fault(r, n, w, hn):
        seen[n] = ({k: v.clone() for k, v in w.items() if isinstance(v, torch.Tensor)},
                   hn["embedding.weight"].clone())
        if n == 2:
            w = dict(w)
            w["features.0.weight"] = torch.full_like(w["features.0.weight"], float("nan"))
        if n == 3:
            return None  # never replies
        return w, hn

    out = str(tmp_path / "run")
    cfg = {"clients": 4, "rounds": 1, "partition": "iid", "tiers": "big=0.75:0.5,phone={macs=100k}:0.5",
           "out": out, "seed": 1}
    rep = run_fl_dwnp(cfg, progress=False, fault_fn=fault)
    h = rep["runs"][0]["history"][0]
    assert h["accepted"] == [1, 4]
    assert [d for d, _ in h["rejected"]] == [2] and "not finite" in h["rejected"][0][1]
    assert [list(x) for x in h["dropped"]] == [[3, "no reply"]]
    ck = torch.load(os.path.join(out, "checkpoint-dwnp.pt"), weights_only=True)
    for k, v in ck["net"].items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            mean = (seen[1][0][k].double() + seen[4][0][k].double()) / 2
            assert torch.allclose(v.double(), mean, rtol=0, atol=1e-6), k
            assert bool(torch.isfinite(v).all())
    emb = ck["hn"]["embedding.weight"]
    assert torch.equal(emb[1], seen[1][1][1]) and torch.equal(emb[4], seen[4][1][4])
    assert torch.allclose(emb[0], (seen[1][1][0] + seen[4][1][0]) / 2, rtol=0, atol=1e-7)
    # silent devices keep the server's rows (device 1 never trains row 2 or 3)
    assert torch.equal(emb[2], seen[1][1][2]) and torch.equal(emb[3], seen[1][1][3])
    assert all(0.0 <= d["accuracy"] <= 1.0 for d in rep["runs"][0]["devices"])


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run(run, tmp_path, capsys):
    from slimkern.fl.dwnp import run_fl_dwnp

    out_ref, rep = run
    out = str(tmp_path / "run")

    def stop(r, n, w, hn):
        if r == 1:
            raise KeyboardInterrupt  # stopped during round 2, after round 1's checkpoint
        return w, hn

    cfg = {"clients": 4, "rounds": 2, "partition": "iid", "tiers": "big=0.75:0.5,phone={macs=100k}:0.5", "out": out,
           "lr": 0.08, "batch_size": 24, "lr_hn": 0.002, "lam": 1.5, "regularizer": "sq_log", "calib_batches": 3}
    with pytest.raises(KeyboardInterrupt):
        run_fl_dwnp(cfg, progress=False, fault_fn=stop)
    assert torch.load(os.path.join(out, "checkpoint-dwnp.pt"), weights_only=True)["round"] == 1
    assert main(ARGS + ["--out", out, "--resume"]) == 0
    with open(os.path.join(out, "report.json")) as fh:
        got = json.load(fh)["runs"][0]
    want = rep["runs"][0]
    for key in ("base_accuracy", "shared_accuracy", "history", "server", "devices"):
        assert got[key] == want[key], key
    for i in range(5):
        a = torch.load(os.path.join(out, "models", f"seed0_p{i}.pt"), weights_only=True)
        b = torch.load(os.path.join(out_ref, "models", f"seed0_p{i}.pt"), weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b if isinstance(b[k], torch.Tensor))
    # a checkpoint of another run is refused, naming what differs
    capsys.readouterr()
    assert main(ARGS[:6] + ["3"] + ARGS[7:] + ["--out", out, "--resume"]) == 2
    assert "rounds" in capsys.readouterr().err
