"""slimkern's task and reply as Flower records (``flwr.app``), and back.

A task travels as ``RecordDict({"arrays": ArrayRecord({"values": ...}), "config": ConfigRecord})``:
``values`` is the flat vector of the sliced parameters of the client's key (exactly
``Task.values``: nothing else of the model travels), the config holds the ``switch`` (its
notation), the full ``key`` (JSON: switch, FedRolex round/step/max_width, label split),
``round``, ``lr``, ``seed``, ``client``, the optimiser settings and the ``rule`` (its
``spec()`` as JSON). FjORD's travelling BN rows, when the rule has them, ride in a second
ArrayRecord ``"bn"`` (``"<switch>|<bn module>|mean"`` / ``"|var"``).

A reply is ``RecordDict({"arrays": ArrayRecord({"values": ...}), "metrics":
MetricRecord({"num-examples": n}), "config": ConfigRecord({"client", "key"})})`` (+ ``"bn"``).
``decode_reply`` never raises: a reply that cannot be read becomes ``(None, reason)``.

Bytes on the wire: ``payload_bytes`` counts ``prod(shape) * itemsize`` of every array of a
record, the element bytes ``simulate`` accounts; each ``Array`` adds the 128-byte header of
NumPy's ``.npy`` format (``Array.data`` is ``np.save`` output), reported separately.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from slimkern.fl.aggregate import ClientUpdate
from slimkern.fl.client import Task
from slimkern.fl.rolex import SubModel

__all__ = ["key_to_json", "key_from_json", "encode_task", "decode_task", "encode_reply", "decode_reply",
           "payload_bytes", "data_bytes"]


def _switch(text: str):
    from slimkern.switch import Switch
    return Switch.parse(text)


def key_to_json(key) -> str:
    if isinstance(key, SubModel):
        return json.dumps({"switch": str(key.switch), "round": key.round, "step": key.step,
                           "max_width": key.max_width, "labels": None if key.labels is None else list(key.labels)})
    return json.dumps({"switch": str(key)})


def key_from_json(text: str):
    d = json.loads(text)
    if not isinstance(d, dict) or not isinstance(d.get("switch"), str):
        raise ValueError(f"a key is a JSON object with a 'switch', got {text[:80]!r}")
    sw = _switch(d["switch"])
    if set(d) == {"switch"}:
        return sw
    labels = d.get("labels")
    return SubModel(sw, d.get("round"), d.get("step"), float(d.get("max_width", 1.0)),
                    None if labels is None else tuple(int(i) for i in labels))


def _bn_to_arrays(rows) -> dict:
    from flwr.app import Array
    out = {}
    for sw, per in (rows or {}).items():
        for name, (mean, var) in per.items():
            out[f"{sw}|{name}|mean"] = Array(mean.detach().cpu().numpy())
            out[f"{sw}|{name}|var"] = Array(var.detach().cpu().numpy())
    return out


def _bn_from_record(rec) -> dict:
    rows: dict = {}
    for k in rec.keys():
        sw, name, which = k.rsplit("|", 2)
        rows.setdefault(_switch(sw), {}).setdefault(name, {})[which] = torch.from_numpy(rec[k].numpy().copy())
    return {sw: {n: (d["mean"], d["var"]) for n, d in per.items()} for sw, per in rows.items()}


def encode_task(task: Task):
    """The ``RecordDict`` of a task (module docstring)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    content = {
        "arrays": ArrayRecord({"values": Array(task.values.detach().cpu().contiguous().numpy())}),
        "config": ConfigRecord({
            "client": int(task.client), "round": int(task.round), "switch": str(task.switch),
            "key": key_to_json(task.key), "lr": float(task.lr), "seed": int(task.seed),
            "local-epochs": int(task.local_epochs), "batch-size": int(task.batch_size),
            "momentum": float(task.momentum), "weight-decay": float(task.weight_decay),
            "rule": json.dumps(task.rule.spec())}),
    }
    if task.bn_rows:
        content["bn"] = ArrayRecord(_bn_to_arrays(task.bn_rows))
    return RecordDict(content)


def decode_task(content) -> Task:
    """The task of a ``RecordDict`` made by ``encode_task``; raises ValueError naming what is wrong."""
    from slimkern.fl.rules import from_spec
    try:
        cfg = content.config_records["config"]
        values = torch.from_numpy(content.array_records["arrays"]["values"].numpy().copy())
        bn = _bn_from_record(content.array_records["bn"]) if "bn" in content.array_records else None
        return Task(int(cfg["client"]), int(cfg["round"]), key_from_json(cfg["key"]), values,
                    from_spec(json.loads(cfg["rule"])), float(cfg["lr"]), int(cfg["seed"]),
                    int(cfg["local-epochs"]), int(cfg["batch-size"]), float(cfg["momentum"]),
                    float(cfg["weight-decay"]), bn)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a slimkern task: {type(exc).__name__}: {exc}") from None


def encode_reply(u: ClientUpdate):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    content = {"arrays": ArrayRecord({"values": Array(u.values.detach().cpu().contiguous().numpy())}),
               "metrics": MetricRecord({"num-examples": float(u.num_samples)}),
               "config": ConfigRecord({"client": int(u.client), "key": key_to_json(u.switch)})}
    if u.stats:
        content["bn"] = ArrayRecord(_bn_to_arrays(u.stats))
    return RecordDict(content)


def decode_reply(content) -> tuple[ClientUpdate | None, str | None]:
    """``(update, None)``, or ``(None, why)`` for a reply that cannot be read (never raises)."""
    try:
        cfg = content.config_records["config"]
        arr = content.array_records["arrays"]["values"]
        values = torch.from_numpy(np.array(arr.numpy(), copy=True))
        n = content.metric_records["metrics"]["num-examples"]
        stats = _bn_from_record(content.array_records["bn"]) if "bn" in content.array_records else None
        return ClientUpdate(int(cfg["client"]), key_from_json(cfg["key"]), values, n, stats=stats), None
    except Exception as exc:  # noqa: BLE001 - whatever a node sends, the server goes on
        return None, f"the reply cannot be read: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def payload_bytes(record, names: Any = None) -> int:
    """Element bytes (``prod(shape) * itemsize``) of the arrays of an ``ArrayRecord``."""
    total = 0
    for k in record.keys():
        if names is not None and k not in names:
            continue
        a = record[k]
        total += math.prod(a.shape) * np.dtype(a.dtype).itemsize
    return total


def data_bytes(record) -> int:
    """Serialised bytes (``len(Array.data)``: element bytes plus the ``.npy`` header)."""
    return sum(len(record[k].data) for k in record.keys())
