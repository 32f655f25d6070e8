"""One training run end to end, as the command line drives it: data, model, recipe, training
with per-epoch checkpoints, BN calibration, evaluation of every switch, the individual
baselines, report (JSON/CSV/table/plot) and exported device models, all in one run folder::

    <out>/config.yaml      the resolved options
    <out>/train.log        the log
    <out>/checkpoint.pt    the shared net's trainer checkpoint (resume continues from it)
    <out>/individual-*.pt  individual baselines' checkpoints
    <out>/report.json, report.csv, plot.png
    <out>/export/<switch>/branch<i>.pt   per-device modules (``slimkern.export``)
"""
from __future__ import annotations

import logging
import os
import time

import torch

from slimkern.report import atomic_write_text

log = logging.getLogger("slimkern")

DEFAULTS: dict = {
    # data
    "dataset": "digits", "data_root": None, "image_size": 32, "channels": 3, "augment": False,
    # model
    "model": "mobilenet_v1", "width_mult": 1.0, "max_width": 1.0,
    # recipe
    "recipe": "paradis", "switches": ["[1.0]x"], "eval_switches": [], "individual": [],
    "beta": 1.0, "kd": "wide", "temperature": 1.0, "min_width": 0.25, "n_random": 2, "width_step": 0.03125,
    "label_smoothing": 0.0,
    # optimisation
    "epochs": 10, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True,
    "schedule": "cosine", "milestones": [], "gamma": 0.1, "individual_epochs": 0,
    # A 1-epoch warm-up and clipping at 5 keep the first steps (gradient norms of 100-400 at init,
    # summed over every switch's loss) from killing the net's ReLUs (docs/paradis.md, "collapse").
    "warmup_epochs": 1.0, "clip_grad_norm": 5.0, "fail_on_collapse": False, "pack": "auto",
    # run
    "seed": 0, "seeds": [], "deterministic": True, "threads": 0, "calibrate_batches": 20, "eval_batch_size": 256,
    "out": "runs/run", "resume": False, "progress": True, "export": [], "keep_freed_memory": True,
    # data-parallel training (slimkern.train.distributed): ranks, BN statistics, backend
    "nproc": 1, "sync_bn": True, "dist_backend": "auto",
}

MODEL_NAMES = ("mobilenet_v1", "mobilenet_v2", "resnet20", "resnet18")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
RECIPES = ("paradis", "sandwich", "individual")


def parse_switch(text):
    """``"[0.5, 0.5]x"``, ``"[0.5,0.5]"`` (the trailing x optional), ``"0.5"``, or a Switch."""
    import slimkern

    if isinstance(text, slimkern.Switch):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return slimkern.Switch.width(float(text))
    s = str(text).strip()
    if s and not s.endswith("x") and not s.endswith("ch"):
        s = s + "x"
    try:
        return slimkern.Switch.parse(s)
    except ValueError as exc:  # name what the user typed, not the completed notation
        raise ValueError(str(exc).replace(f"switch {s!r}", f"switch {text!r}", 1)) from None


_PACK = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}


def pack_value(pack):
    """The trainers' ``pack`` from ``--pack auto|on|off`` (a config file quotes the value)."""
    if isinstance(pack, bool):
        return pack
    key = str(pack).strip().lower()
    if key not in _PACK:
        raise ValueError(f"pack must be auto, on or off, got {pack!r}")
    return _PACK[key]


def check(cfg: dict) -> None:
    """Validate option values with messages a command-line user understands."""
    if cfg["model"] not in MODEL_NAMES:
        raise ValueError(f"unknown model {cfg['model']!r}; choose one of {MODEL_NAMES}")
    if cfg["dataset"] not in DATASETS:
        raise ValueError(f"unknown dataset {cfg['dataset']!r}; choose one of {DATASETS}")
    if cfg["recipe"] not in RECIPES:
        raise ValueError(f"unknown recipe {cfg['recipe']!r}; choose one of {RECIPES}")
    if cfg["dataset"] != "digits" and not cfg["data_root"]:
        raise ValueError(f"dataset {cfg['dataset']!r} needs --data-root (slimkern never downloads)")
    if cfg["dist_backend"] not in ("auto", "gloo", "nccl"):
        raise ValueError(f"dist_backend must be auto, gloo or nccl, got {cfg['dist_backend']!r}")
    pack_value(cfg["pack"])  # raises ValueError naming the accepted values
    for key in ("epochs", "batch_size", "nproc"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    for key in ("switches", "eval_switches", "individual", "export"):
        for s in cfg[key]:
            sw = parse_switch(s)  # raises ValueError naming the bad switch
            # the individual baselines are built as wide as their switch; the sandwich recipe
            # trains widths between --min-width and --max-width, not --switches
            if key == "individual" or (key == "switches" and cfg["recipe"] == "sandwich"):
                continue
            if sw.max_fraction > float(cfg["max_width"]) + 1e-9:
                raise ValueError(f"{key}: switch {s!r} reaches {sw.max_fraction:g}x the base width, above "
                                 f"--max-width {cfg['max_width']:g} (the widest switch the net is built for)")


def load_data(cfg: dict):
    from slimkern import data as D

    if cfg["dataset"] == "digits":
        return D.digits(image_size=cfg["image_size"], channels=cfg["channels"], seed=cfg["seed"])
    if cfg["dataset"] == "cifar10":
        return D.cifar10(cfg["data_root"], augment=cfg["augment"])
    if cfg["dataset"] == "cifar100":
        return D.cifar100(cfg["data_root"], augment=cfg["augment"])
    return D.image_folder(cfg["data_root"], image_size=cfg["image_size"], augment=cfg["augment"])


def build_model(cfg: dict, split, max_width: float | None = None):
    """The configured model, its initial weights drawn from ``cfg["seed"]`` (the same seed gives
    the same run) without touching the global RNG."""
    from slimkern import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        return models.build(cfg["model"], num_classes=split.num_classes, in_channels=split.in_channels,
                            max_width=cfg["max_width"] if max_width is None else max_width,
                            width_mult=cfg["width_mult"])


def _trainer_kwargs(cfg: dict, checkpoint: str, distributed=None) -> dict:
    main = distributed is None or distributed.is_main
    return dict(distributed=distributed,
                lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"],
                schedule=cfg["schedule"], milestones=cfg["milestones"], gamma=cfg["gamma"],
                warmup_epochs=cfg["warmup_epochs"], label_smoothing=cfg["label_smoothing"], seed=cfg["seed"],
                deterministic=cfg["deterministic"], checkpoint=checkpoint, progress=cfg["progress"] and main,
                clip_grad_norm=cfg["clip_grad_norm"] or None, fail_on_collapse=cfg["fail_on_collapse"],
                pack=pack_value(cfg["pack"]))


def make_trainer(cfg: dict, net, checkpoint: str, distributed=None):
    from slimkern import train as T

    kw = _trainer_kwargs(cfg, checkpoint, distributed)
    sws = [parse_switch(s) for s in cfg["switches"]]
    if cfg["recipe"] == "paradis":
        return T.ParaDiSTrainer(net, sws, beta=cfg["beta"], kd=cfg["kd"], temperature=cfg["temperature"], **kw)
    if cfg["recipe"] == "sandwich":
        return T.SandwichTrainer(net, max_width=cfg["max_width"], min_width=cfg["min_width"],
                                 n_random=cfg["n_random"], temperature=cfg["temperature"],
                                 width_step=cfg["width_step"] or None, **kw)
    if len(sws) != 1:
        raise ValueError(f"recipe 'individual' trains one switch, got {len(sws)}: {cfg['switches']}")
    return T.IndividualTrainer(net, sws[0], **kw)


def setup_run_folder(cfg: dict) -> str:
    import yaml

    out = os.path.abspath(cfg["out"])
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(dict(cfg), sort_keys=True))
    logger = logging.getLogger("slimkern")
    logger.setLevel(logging.INFO)
    path = os.path.join(out, "train.log")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(h)
    return out


def _switch_dirname(sw) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in str(sw)).strip("_")


def run(cfg: dict, console=None, title: str | None = None):
    """Train, calibrate, evaluate, report and export as ``cfg`` says; returns the Report.

    Launched as one rank of a data-parallel job (``slimkern train --nproc N``, torchrun), every
    rank trains (``slimkern.train.distributed``; ``batch_size`` is per rank) and rank 0 alone
    writes the run folder, calibrates, evaluates and exports; the other ranks return None."""
    import slimkern
    from torch.utils.data import DataLoader

    from slimkern.train import distributed as D

    check(cfg)
    dp = D.init_from_env(cfg["dist_backend"], sync_bn=cfg["sync_bn"])
    if dp is not None and cfg["nproc"] > 1 and dp.world_size != cfg["nproc"]:
        raise ValueError(f"--nproc {cfg['nproc']} but the launcher started {dp.world_size} processes")
    main = dp is None or dp.is_main
    if cfg["keep_freed_memory"]:
        from slimkern.train.memory import keep_freed_memory

        log.info("glibc keeps freed memory for reuse: %s", keep_freed_memory())
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out = setup_run_folder(cfg) if main else os.path.abspath(cfg["out"])
    t_start = time.perf_counter()
    split = load_data(cfg)
    net = build_model(cfg, split)
    trainer = make_trainer(cfg, net, os.path.join(out, "checkpoint.pt"), dp)
    log.info("training %s (%s) on %s for %d epochs: switches %s", cfg["model"], cfg["recipe"], cfg["dataset"],
             cfg["epochs"], [str(s) for s in trainer.trained_switches()])
    trainer.fit(split.train, cfg["epochs"], batch_size=cfg["batch_size"], resume=cfg["resume"])
    t_train = time.perf_counter() - t_start

    trained = trainer.trained_switches()
    eval_sws = list(dict.fromkeys(trained + [parse_switch(s) for s in cfg["eval_switches"]]))
    calib = DataLoader(split.train, batch_size=cfg["batch_size"], shuffle=True,
                       generator=torch.Generator().manual_seed(cfg["seed"] + 7))
    if main:
        slimkern.calibrate_bn(net, calib, eval_sws, num_batches=cfg["calibrate_batches"])

    individual = {}
    for s in cfg["individual"]:
        sw = parse_switch(s)
        inet = build_model(cfg, split, max_width=max(1.0, sw.max_fraction))
        ikw = dict(cfg, recipe="individual", switches=[str(sw)])
        it = make_trainer(ikw, inet, os.path.join(out, f"individual-{_switch_dirname(sw)}.pt"), dp)
        log.info("training the individual %s baseline", sw)
        it.fit(split.train, cfg["individual_epochs"] or cfg["epochs"], batch_size=cfg["batch_size"],
               resume=cfg["resume"])
        if main:
            slimkern.calibrate_bn(inet, calib, [sw], num_batches=cfg["calibrate_batches"])
        individual[sw] = inet
    if not main:
        return None

    test = DataLoader(split.test, batch_size=cfg["eval_batch_size"], shuffle=False)
    report = slimkern.evaluate(net, test, eval_sws, trained=trained, individual=individual,
                               input_size=split.input_size, progress=cfg["progress"])
    report.meta.update({"title": title or f"{cfg['recipe']} {cfg['model']} on {cfg['dataset']}",
                        "model": cfg["model"], "dataset": cfg["dataset"], "recipe": cfg["recipe"],
                        "epochs": cfg["epochs"], "train_seconds": round(t_train, 2),
                        "total_seconds": round(time.perf_counter() - t_start, 2)})
    report.to_json(os.path.join(out, "report.json"))
    report.to_csv(os.path.join(out, "report.csv"))
    report.plot(os.path.join(out, "plot.png"))
    if cfg["export"] and not hasattr(slimkern, "export"):
        log.warning("export of %s skipped: slimkern.export is not available in this build", cfg["export"])
    else:
        for s in cfg["export"]:
            export_switch(net, parse_switch(s), out, split.input_size)
    report.meta["total_seconds"] = round(time.perf_counter() - t_start, 2)
    report.to_json(os.path.join(out, "report.json"))
    if console is not None:
        console.print(report.table())
    log.info("run folder: %s", out)
    return report


def export_switch(net, sw, out: str, input_size=None) -> list[str]:
    """``slimkern.export(net, sw)`` into ``export/<switch>/`` (``slimkern.export.save``): per device
    ``branch<i>.pt2`` (a ``torch.export`` program) and ``branch<i>.state_dict.pt``, and the fused
    ``deployable.pt2`` / ``deployable.state_dict.pt``; nothing pickled, so every file loads with
    ``torch.load(weights_only=True)`` or ``torch.export.load``. ``input_size``: the traced
    input's shape (default: one image at the net's recorded input size, else 1x3x32x32)."""
    import slimkern
    from slimkern.export import save

    net.eval()
    dep = slimkern.export(net, sw)
    folder = os.path.join(out, "export", _switch_dirname(sw))
    p = next(iter(net.parameters()))
    x = torch.zeros(tuple(input_size or (1, 3, 32, 32)), dtype=p.dtype, device=p.device)
    paths = save(dep, folder, x)
    log.info("exported %s: %d device module(s) in %s", sw, len(paths), folder)
    return paths
