"""DWNP's objective (Gao et al., "Device-Wise Federated Network Pruning", eq. 4).

    (1/N) sum_n L(W, D_n^a; a^0 * a^n)
      + lambda [ R(T(a^0), p_s T_total) + (1/N) sum_n R(T(a^0 * a^n), p_d^n T_total) ]

``T`` is ``slimkern.prune.flops.FlopsModel.flops``; ``p_s`` the server's and ``p_d^n`` device
``n``'s FLOPs ratio targets. The paper leaves the regulariser ``R`` open; two are provided:

* ``"abs_log"`` (default, AutoTrainOnce's): ``R(T, T*) = |log(T / T*)|`` -- scale free,
  symmetric in the ratio (2x over costs what 2x under costs), constant-magnitude gradient so
  the resource term keeps pulling until the target is reached;
* ``"sq_log"``: ``R(T, T*) = (log(T / T*))^2`` -- smooth at the target, weaker near it.
"""
from __future__ import annotations

import math

import torch

__all__ = ["resource_regularizer", "dwnp_objective", "REGULARIZERS"]

REGULARIZERS = ("abs_log", "sq_log")


def resource_regularizer(t: torch.Tensor, target: float, kind: str = "abs_log") -> torch.Tensor:
    """``R(T, T*)`` (module docstring); ``t`` a positive scalar tensor, ``target > 0``."""
    if kind not in REGULARIZERS:
        raise ValueError(f"resource_regularizer: kind must be one of {REGULARIZERS}, got {kind!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0 or not math.isfinite(target):
        raise ValueError(f"resource_regularizer: target must be a finite number > 0, got {target!r}")
    r = torch.log(t) - math.log(target)
    return r.abs() if kind == "abs_log" else r * r


def _ratio(p, what):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"dwnp_objective: {what} is a FLOPs ratio and must be in (0, 1], got {p!r}")
    return float(p)


def dwnp_objective(task_losses, t_server: torch.Tensor, t_devices, p_server: float, p_devices, t_total: float,
                   lam: float = 1.0, kind: str = "abs_log") -> tuple[torch.Tensor, dict]:
    """Eq. 4: returns ``(total, parts)`` with ``parts = {"task", "server", "devices"}`` (floats).

    ``task_losses[n-1]`` is device ``n``'s loss under mask ``a^0 * a^n``, ``t_devices[n-1] =
    T(a^0 * a^n)``, ``p_devices[n-1]`` its target ratio; ``t_server = T(a^0)``."""
    task_losses, t_devices, p_devices = list(task_losses), list(t_devices), list(p_devices)
    n = len(task_losses)
    if n == 0 or len(t_devices) != n or len(p_devices) != n:
        raise ValueError(f"dwnp_objective: need one task loss, one T and one target per device; got "
                         f"{len(task_losses)}, {len(t_devices)}, {len(p_devices)}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"dwnp_objective: lambda must be >= 0, got {lam!r}")
    if isinstance(t_total, bool) or not isinstance(t_total, (int, float)) or t_total <= 0:
        raise ValueError(f"dwnp_objective: t_total must be > 0, got {t_total!r}")
    p_server = _ratio(p_server, "p_server")
    p_devices = [_ratio(p, f"p_devices[{i}]") for i, p in enumerate(p_devices)]
    task = sum(task_losses) / n
    server = resource_regularizer(t_server, p_server * t_total, kind)
    devices = sum(resource_regularizer(t, p * t_total, kind) for t, p in zip(t_devices, p_devices)) / n
    total = task + lam * (server + devices)
    return total, {"task": float(task.detach()), "server": float(server.detach()), "devices": float(devices.detach())}
