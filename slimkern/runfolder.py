"""Run-folder writing shared by the experiment commands (SR Figure 7, scaling, deploy):
atomic JSON / CSV files and mean ± sample std over seeds."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Iterable, Sequence

from slimkern.report import atomic_write_text

__all__ = ["write_json", "write_csv", "mean_std", "summarize"]


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON, written atomically (tmp file + ``os.replace``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    """Rows of dicts as CSV (columns: ``fields`` or the keys of the first row), atomically."""
    if not rows:
        raise ValueError(f"write_csv: no rows for {os.fspath(path)!r}")
    fields = list(fields or rows[0].keys())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std: no values")
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def summarize(rows: Sequence[dict], keys: Sequence[str], value: str, carry: Sequence[str] = ()) -> list[dict]:
    """Groups ``rows`` by ``keys`` (order of first appearance) and gives ``value``'s mean, std
    and count per group, plus the ``carry`` columns of the group's first row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for k, rs in groups.items():
        m, s = mean_std(r[value] for r in rs)
        out.append({**dict(zip(keys, k)), **{c: rs[0][c] for c in carry}, f"{value}_mean": m, f"{value}_std": s,
                    "n": len(rs)})
    return out


def add_options(p, defaults: dict, list_types: dict | None = None) -> None:
    """One ``--flag`` per key of ``defaults`` (dashes for underscores): booleans as
    ``--x/--no-x``, lists as ``nargs="+"`` of ``list_types[key]`` (default str)."""
    import argparse

    for k, v in defaults.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
        elif isinstance(v, list):
            p.add_argument(flag, nargs="+", type=(list_types or {}).get(k, str), default=v)
        elif v is None:
            p.add_argument(flag, default=None)
        else:
            p.add_argument(flag, type=type(v), default=v)


def experiment_main(prog: str, doc: str, add, run, table, argv=None) -> int:
    """The ``python -m`` entry of an experiment: parse (``add(parser)``), log, ``run(options)``,
    print ``table(report)`` and the run folder."""
    import argparse
    import logging

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rep = run(vars(args))
    print(table(rep))
    print(f"run folder: {os.path.abspath(args.out)}")
    return 0


def start(cfg: dict, defaults: dict, what: str) -> tuple[dict, str]:
    """``(defaults | cfg, absolute run folder)`` for a seeded experiment: checks there is a seed,
    sets ``cfg["threads"]`` torch threads (0: leave), creates the folder."""
    cfg = {**defaults, **cfg}
    if not cfg.get("seeds"):
        raise ValueError(f"{what}: give at least one seed")
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    out = os.path.abspath(cfg["out"])
    os.makedirs(out, exist_ok=True)
    return cfg, out
