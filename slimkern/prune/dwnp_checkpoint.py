"""Checkpoints of ``dwnp_federated``: a stopped run resumes to the identical result.

After the unpruned FedAvg baseline and after every DWNP round the loop saves, atomically, the
round reached, the shared weights ``W``, the hypernetwork (embeddings included), the history,
the baseline's accuracy, torch's global RNG state and the *run description*: every input that
changes the rounds' results (targets, learning rates, lambda, regulariser, rounds, epochs,
batch size, data split fraction, groups, seed, the model's structure and initial weights, a
digest of every device's data). Every per-round random draw of the loop is seeded from
``(seed, round, device)``, so restoring these is enough for bit-identical continuation.

The mechanics are ``slimkern.fl.fingerprint``'s (the federated core's checkpoints): atomic
``torch.save`` with ``fsync``, ``torch.load(weights_only=True)``, and a resume refused with a
ValueError naming every field that differs when the checkpoint belongs to another run.
Options that only shape the final models (``project``, ``tol``, ``calibrate_batches``) are not
part of the description: changing them on resume is allowed and takes effect.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from slimkern.fl import fingerprint as _fp

__all__ = ["data_digest", "run_description", "save_round", "load_round"]

FORMAT = 1


def data_digest(sets: Sequence[Dataset]) -> str:
    """SHA-256 (16 hex digits) of every device's samples, in order (inputs and labels)."""
    h = hashlib.sha256()
    for ds in sets:
        h.update(str(len(ds)).encode())
        for i in range(len(ds)):
            x, y = ds[i]
            h.update(torch.as_tensor(x).detach().contiguous().numpy().tobytes())
            h.update(str(int(y)).encode())
    return h.hexdigest()[:16]


def run_description(net: torch.nn.Module, sets: Sequence[Dataset], **fields) -> dict:
    """The description ``check`` compares: ``fields`` plus the model's structure, its initial
    weights and the devices' data."""
    flat = torch.cat([p.detach().reshape(-1) for p in net.state_dict().values()
                      if isinstance(p, torch.Tensor) and p.dtype.is_floating_point])
    return _fp.describe(**fields, model=_fp.model_digest(net), initial_weights=_fp.weights_hash(flat),
                        data=data_digest(sets))


def save_round(path: str, round_done: int, desc: dict, net: torch.nn.Module, hn: torch.nn.Module,
               history: list[dict], base_accuracy: float | None) -> None:
    """Writes the state after ``round_done`` DWNP rounds (0: after the baseline)."""
    _fp.save_checkpoint({"format": FORMAT, "method": "dwnp", "round": int(round_done), "run": json.dumps(desc),
                         "net": net.state_dict(), "hn": hn.state_dict(), "history": json.dumps(history),
                         "base_accuracy": base_accuracy, "rng": torch.get_rng_state()}, path)


def load_round(path: str, desc: dict) -> dict:
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``), refused unless it was
    written by the run ``desc`` describes; ``history`` comes back as a list."""
    ck = _fp.load_checkpoint(path)
    if ck.get("method") != "dwnp" or ck.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a dwnp_federated checkpoint (format {FORMAT}); remove it or "
                         "pass resume=False")
    _fp.check(ck, desc, path)
    ck["history"] = json.loads(ck["history"])
    return ck
