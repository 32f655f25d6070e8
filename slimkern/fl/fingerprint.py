"""What a federated run is, so that ``resume`` cannot silently continue another run.

A checkpoint of ``slimkern.fl.simulate`` stores the *run description*: every input that
changes the trained weights -- the strategy with its arguments (``repr``), seed, learning
rate and schedule, rounds (the cosine schedule depends on them), local epochs, batch size,
momentum, weight decay, client dropout, clients per round, update clipping and sample
bounds, augmentation, the parameter names and shapes, the model's structure (module
classes and dropout rates), a hash of the initial weights and a digest of the clients
(ids, tiers, switches, sample indices). ``check`` compares the
stored description with the one of the run being resumed and raises a ValueError that
names every field that differs.

Determinism: everything random in a round is derived from ``(seed, round, client)``.
``client_rng`` gives stochastic layers that draw from torch's global generator
(``nn.Dropout``, ``F.dropout``, stochastic depth ...) a generator seeded from that stream
for the duration of a client's local training, and restores the global state afterwards,
so neither does the global RNG leak into the run nor does the run disturb the caller's.

Checkpoints are written atomically (a temporary file in the same folder, flushed and
``fsync``-ed, then ``os.replace``) and read with ``torch.load(weights_only=True)``: a
checkpoint holds tensors and plain containers only, and a file that would need arbitrary
unpickling is refused instead of executed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["weights_hash", "clients_digest", "model_digest", "describe", "differences", "check", "save_checkpoint",
           "load_checkpoint", "client_rng", "FORMAT"]

FORMAT = 2  # checkpoint format: 2 = with a run description ("run")


def weights_hash(flat: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's bytes (the initial flat parameters)."""
    t = flat.detach().to("cpu").contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]


def clients_digest(clients) -> str:
    """A digest of the clients: id, tier, tier switch and every sample index."""
    h = hashlib.sha256()
    for c in clients:
        idx = np.ascontiguousarray(np.asarray(c.indices, dtype=np.int64))
        h.update(json.dumps([int(c.id), str(c.tier), str(c.tier_switch), int(idx.size)]).encode())
        h.update(idx.tobytes())
    return h.hexdigest()[:16]


def model_digest(net) -> str:
    """A digest of the model's structure: every module's name and class, and the rate of
    every dropout layer (weights are hashed separately; switch state is left out)."""
    desc = []
    for name, m in net.named_modules():
        item = [name, f"{type(m).__module__}.{type(m).__qualname__}"]
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            item.append(float(m.p))
        desc.append(item)
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _plain(v: Any):
    """A JSON value for ``v`` (floats exactly, via ``repr`` where JSON cannot say it)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if np.isfinite(v) else repr(v)
    if isinstance(v, (np.integer, np.floating)):
        return _plain(v.item())
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


def describe(**fields) -> dict:
    """The run description: ``fields`` as plain JSON values (``repr`` for objects)."""
    return {k: _plain(v) for k, v in fields.items()}


def differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every field that differs."""
    missing = object()
    out = []
    for k in list(saved) + [k for k in now if k not in saved]:
        a, b = saved.get(k, missing), now.get(k, missing)
        if a != b:
            out.append((k, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
    return out


def _short(v, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def check(ck: dict, now: dict, path: str) -> None:
    """Raises ValueError unless checkpoint ``ck`` (from ``load_checkpoint``) was written by
    the run ``now`` describes; the message names every field that differs."""
    saved = ck.get("run")
    if isinstance(saved, str):
        try:
            saved = json.loads(saved)
        except ValueError:
            saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path} carries no run description (written by an older slimkern or "
                         "another program), so it cannot be told to belong to this run; remove it or pass "
                         "resume=False")
    diff = differences(saved, now)
    if diff:
        what = "; ".join(f"{k}: checkpoint {_short(a)}, now {_short(b)}" for k, a, b in diff)
        names = ", ".join(k for k, _, _ in diff)
        verb = "differs" if len(diff) == 1 else "differ"
        raise ValueError(f"checkpoint {path} belongs to another run ({names} {verb}: {what}); "
                         "remove it or pass resume=False")


def save_checkpoint(obj: dict, path: str) -> None:
    """``torch.save`` to ``path`` atomically: a reader sees the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is not a plain
    checkpoint (or is damaged) is a ValueError saying so."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ValueError(f"checkpoint {path} cannot be loaded safely (torch.load weights_only=True: "
                         f"{type(exc).__name__}: {msg}); remove it or pass resume=False") from None
    if not isinstance(ck, dict):
        raise ValueError(f"checkpoint {path} is not a slimkern.fl checkpoint (a {type(ck).__name__})")
    return ck


def _stream_seed(*key: int) -> int:
    return int(np.random.default_rng([int(k) for k in key]).integers(2 ** 62))


@contextlib.contextmanager
def client_rng(seed: int, round_index: int, client: int) -> Iterator[None]:
    """Torch's global generators seeded from ``(seed, round, client)`` inside the block
    (CPU, and the current CUDA device when CUDA is initialised), restored afterwards."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_stream_seed(seed, round_index, client, 13))
        yield
