"""The run configuration of slimkern's Flower apps, and the experiment it describes.

Both apps read the same ``[tool.flwr.app.config]`` (``context.run_config``): the ServerApp
builds the shared model, the clients (ids, tiers, sample indices) and the server's
calibration and test data; a ClientApp builds the same clients and trains the one whose id
is its ``node_config["partition-id"]``. ``build(cfg)`` is that construction, shared with
``simulate`` runs of the same experiment (the acceptance test compares the two).
Data: scikit-learn's bundled ``digits`` split as ``slimkern demo`` splits it
(``slimkern.fl.demo.load_digits_split``); nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["DEFAULTS", "from_run_config", "build", "Setup"]

DEFAULTS: dict[str, Any] = {
    "strategy": "heterofl", "rule-args": "{}",
    "tiers": "full device=1.0:0.3,small device=0.5:0.4,two small devices=[0.5,0.5]:0.3",
    "clients": 3, "partition": "dirichlet", "alpha": 0.5, "classes-per-client": 2,
    "rounds": 3, "local-epochs": 1, "clients-per-round": 0, "lr": 0.1, "lr-schedule": "constant",
    "batch-size": 16, "momentum": 0.9, "weight-decay": 5e-4, "channels": "32,64,12",
    "aug-rotate": 0.0, "aug-translate": 0.0, "aug-scale": 0.0, "calib-fraction": 0.1, "calib-batches": 8,
    "eval-every": 1, "seed": 0, "threads": 1, "timeout": 600.0, "out-dir": "",
}


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``DEFAULTS`` overridden by a Flower run config (unknown keys are an error naming them)."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown slimkern run-config keys {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **dict(run_config)}
    for k, v in DEFAULTS.items():
        if isinstance(v, float) and isinstance(cfg[k], int) and not isinstance(cfg[k], bool):
            cfg[k] = float(cfg[k])
        if type(cfg[k]) is not type(v):
            raise ValueError(f"run-config {k!r} must be a {type(v).__name__}, got {cfg[k]!r}")
    return cfg


@dataclass
class Setup:
    cfg: dict
    train: tuple
    calib: tuple
    test: tuple
    clients: list
    augment: Any

    def net(self):
        """The shared model, initialised from ``seed`` (the same on every machine)."""
        from slimkern.fl.models import small_cnn
        return small_cnn(10, 1, self.channels, seed=self.cfg["seed"])

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in str(self.cfg["channels"]).split(","))

    def rule(self):
        from slimkern.fl.rules import RULES, get_rule
        args = json.loads(self.cfg["rule-args"] or "{}")
        if not isinstance(args, dict):
            raise ValueError(f"rule-args must be a JSON object, got {self.cfg['rule-args']!r}")
        get_rule(self.cfg["strategy"])  # unknown names: the registry's message
        return RULES[self.cfg["strategy"]](**args)

    def simulate_kwargs(self) -> dict:
        """The arguments of ``simulate`` (and of ``Server``) that this run config fixes."""
        c = self.cfg
        return dict(rounds=c["rounds"], local_epochs=c["local-epochs"], lr=c["lr"], batch_size=c["batch-size"],
                    clients_per_round=c["clients-per-round"] or None, seed=c["seed"], calib_set=self.calib,
                    momentum=c["momentum"], weight_decay=c["weight-decay"], lr_schedule=c["lr-schedule"],
                    eval_every=c["eval-every"], calib_batches=c["calib-batches"])


def build(cfg: Mapping[str, Any]) -> Setup:
    """Data, clients and augmentation of the experiment ``cfg`` (``from_run_config``)."""
    from slimkern.fl.demo import load_digits_split
    from slimkern.fl.simulate import make_clients, parse_tiers
    cfg = from_run_config(cfg)
    train, calib, test = load_digits_split(cfg["seed"], cfg["calib-fraction"])
    clients = make_clients(train[1].numpy(), parse_tiers(cfg["tiers"]), cfg["clients"], cfg["partition"],
                           alpha=cfg["alpha"], classes_per_client=cfg["classes-per-client"], seed=cfg["seed"])
    augment = None
    if cfg["aug-rotate"] or cfg["aug-translate"] or cfg["aug-scale"]:
        from slimkern.fl.augment import RandomAffine
        augment = RandomAffine(cfg["aug-rotate"], cfg["aug-translate"], cfg["aug-scale"], fill=float(train[0].min()))
    return Setup(cfg, train, calib, test, clients, augment)
