"""Shared pieces of the studies: central training on digits, accuracy, mean ± std, run files."""
from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from slimkern.report import atomic_write_text, save_figure  # save_figure: re-exported for the studies

__all__ = ["train_central", "accuracy", "calibrate", "mean_std", "fmt", "write_json", "write_csv", "save_figure"]


def train_central(net, X, Y, *, epochs: int = 15, lr: float = 0.05, batch_size: int = 32, seed: int = 0,
                  switch=None) -> None:
    """SGD (momentum 0.9, cosine lr over epochs) on ``(X, Y)``, batch order seeded by ``seed``."""
    from slimkern.nn import use_switch
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    ctx = use_switch(net, switch) if switch is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=gen)
            for i in range(0, len(X) - 1, batch_size):
                bi = perm[i:i + batch_size]
                if len(bi) < 2:
                    continue
                loss = F.cross_entropy(net(X[bi]), Y[bi])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    net.eval()


def accuracy(net, X, Y, switch=None) -> float:
    from slimkern.nn import use_switch
    net.eval()
    with torch.no_grad():
        if switch is None:
            out = net(X)
        else:
            with use_switch(net, switch):
                out = net(X)
    return float((out.argmax(1) == Y).float().mean())


def calibrate(net, X, switches=("[1.0]x",), batch_size: int = 64) -> None:
    """BN statistics of ``switches`` recomputed on ``X`` (``slimkern.calibrate_bn``)."""
    from slimkern.nn import calibrate_bn
    calibrate_bn(net, [(X[i:i + batch_size],) for i in range(0, len(X), batch_size)], list(switches))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value); NaNs are skipped."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float))


def write_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def makedirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)
