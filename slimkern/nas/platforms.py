"""Target platforms and their market weights (Chinese restaurant process).

Multi-platform width search (Wang & Blaschko, "Optimizing Slimmable Networks for Multiple
Target Platforms") trains one slimmable net for ``m`` platforms, each a resource budget
``R_k`` and an economic weight ``mu_k`` (its market share):

.. math:: \\min_w \\sum_k \\mu_k \\min_{c_k} L(c_k, w) \\quad \\text{s.t.}\\ R(c_k) \\le R_k .

Market shares are modelled by the two-parameter Chinese restaurant process (Pitman-Yor,
``CRP(alpha, theta)``): after ``t`` customers seated at ``|B|`` tables, customer ``t+1``

* opens a new table with probability ``(theta + alpha |B|) / (t + theta)``,
* joins table ``b`` with probability ``(|b| - alpha) / (t + theta)``;

valid for ``0 <= alpha < 1, theta > -alpha`` (or ``alpha < 0`` and ``theta = -L alpha`` for an
integer ``L``: at most ``L`` tables). The paper fits US mobile vendor shares with
``alpha = 0.3, theta = 0.15``. Its Table 1 settings (``WEIGHT_SETTINGS``) fix the weights of
platforms #1 and #7 at 0.25 and spread 0.5 over #2..#6.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["COSTS", "Platform", "WEIGHT_SETTINGS", "crp_partition", "crp_weights", "setting_weights",
           "check_platforms"]

# Table 1 of Wang & Blaschko: the weights of platforms #2..#6 (#1 and #7 are 0.25 each).
_TABLE1 = {
    "S": (0.005, 0.010, 0.045, 0.130, 0.310),
    "RS": (0.310, 0.130, 0.045, 0.010, 0.005),
    "U": (0.100, 0.100, 0.100, 0.100, 0.100),
    "M": (0.025, 0.0625, 0.325, 0.0625, 0.025),
    "L": (0.005, 0.010, 0.020, 0.040, 0.425),
    "RL": (0.425, 0.040, 0.020, 0.010, 0.005),
}
#: The six weight settings of the paper's Table 1, seven platforms each (#1..#7), summing to 1.
WEIGHT_SETTINGS: dict[str, tuple[float, ...]] = {k: (0.25, *v, 0.25) for k, v in _TABLE1.items()}

#: Resource kinds a platform budget may be given in.
COSTS = ("macs", "params", "peak_activation", "latency")


def _rng(generator) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return np.random.default_rng(seed)
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(f"generator must be None, an int seed, a numpy Generator or a torch.Generator, "
                    f"got {type(generator).__name__}")


def _check_crp(alpha, theta) -> tuple[float, float]:
    for name, v in (("alpha", alpha), ("theta", theta)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"CRP {name} must be a finite number, got {v!r}")
    alpha, theta = float(alpha), float(theta)
    if alpha >= 1:
        raise ValueError(f"CRP alpha must be < 1, got {alpha}")
    if 0 <= alpha:
        if not theta > -alpha:
            raise ValueError(f"CRP with 0 <= alpha < 1 needs theta > -alpha, got alpha={alpha}, theta={theta}")
    else:
        n_max = -theta / alpha
        if abs(n_max - round(n_max)) > 1e-9 or round(n_max) < 1:
            raise ValueError(f"CRP with alpha < 0 needs theta = -L * alpha for a positive integer L (at most L "
                             f"tables), got alpha={alpha}, theta={theta} (theta/-alpha = {n_max:.6g})")
    return alpha, theta


def crp_partition(customers: int, alpha: float, theta: float, generator=None) -> list[int]:
    """Seats ``customers`` by the two-parameter Chinese restaurant process; returns the table
    sizes in the order the tables were opened.

    Customer ``t+1`` (after ``t`` seated at ``K`` tables) opens a new table with probability
    ``(theta + alpha K) / (t + theta)`` and joins table ``b`` with ``(n_b - alpha) / (t + theta)``.
    The partition is exchangeable with the Pitman-Yor EPPF
    ``p(n_1..n_K) = prod_{i<K}(theta + i alpha) / (theta + 1)^{(n-1)} * prod_b (1 - alpha)^{(n_b - 1)}``
    (rising factorials), and ``E[K_n] = theta/alpha * ((theta + alpha)^{(n)} / theta^{(n)} - 1)``
    (``sum_{i<n} theta / (theta + i)`` for ``alpha = 0``) (Pitman, "Combinatorial Stochastic
    Processes", 2006, Sec. 3.2).

    Args:
        customers: number of customers, ``>= 1``.
        alpha: discount, ``< 1``; theta: concentration (see the module docstring for the ranges).
        generator: None, an int seed, a ``numpy.random.Generator`` or a ``torch.Generator``.
    """
    if isinstance(customers, bool) or not isinstance(customers, numbers.Integral) or customers < 1:
        raise ValueError(f"customers must be a positive int, got {customers!r}")
    alpha, theta = _check_crp(alpha, theta)
    rng = _rng(generator)
    sizes: list[int] = []
    u = rng.random(int(customers)).tolist()
    for t in range(int(customers)):  # t customers already seated
        k = len(sizes)
        p_new = 1.0 if t == 0 else (theta + alpha * k) / (t + theta)
        if u[t] < p_new:
            sizes.append(1)
            continue
        # join table b with probability (n_b - alpha) / (t - alpha k), given no new table
        r = (u[t] - p_new) / (1.0 - p_new) * (t - alpha * k)
        b, acc = k - 1, 0.0
        for i, s in enumerate(sizes):
            acc += s - alpha
            if r < acc:
                b = i
                break
        sizes[b] += 1
    return sizes


def crp_weights(num_platforms: int, alpha: float = 0.3, theta: float = 0.15, customers: int = 10000,
                seed: int | None = 0, draws: int = 1, order: str = "ascending") -> list[float]:
    """Market weights from a CRP: the shares of the ``num_platforms`` largest tables, normalised.

    Runs :func:`crp_partition` ``draws`` times (the ranked shares are averaged over draws), keeps
    the ``num_platforms`` largest tables (zero share when fewer tables opened), normalises them to
    sum 1 and sorts them: ``"ascending"`` puts the largest share on the last platform (the paper's
    setting S, "peak at #6"), ``"descending"`` on the first (RS).
    """
    if isinstance(num_platforms, bool) or not isinstance(num_platforms, numbers.Integral) or num_platforms < 1:
        raise ValueError(f"num_platforms must be a positive int, got {num_platforms!r}")
    if isinstance(draws, bool) or not isinstance(draws, numbers.Integral) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    if order not in ("ascending", "descending"):
        raise ValueError(f"order must be 'ascending' or 'descending', got {order!r}")
    rng = _rng(seed)
    acc = np.zeros(int(num_platforms))
    for _ in range(int(draws)):
        sizes = sorted(crp_partition(customers, alpha, theta, rng), reverse=True)[:num_platforms]
        top = np.zeros(int(num_platforms))
        top[:len(sizes)] = sizes
        acc += top / top.sum()
    w = acc / acc.sum()
    w = np.sort(w) if order == "ascending" else np.sort(w)[::-1]
    return [float(x) for x in w]


def setting_weights(name: str) -> tuple[float, ...]:
    """The seven platform weights of a Table-1 setting (``"S"``, ``"RS"``, ``"U"``, ``"M"``, ``"L"``, ``"RL"``)."""
    if name not in WEIGHT_SETTINGS:
        raise ValueError(f"unknown weight setting {name!r}; choose one of {list(WEIGHT_SETTINGS)}")
    return WEIGHT_SETTINGS[name]


@dataclass(frozen=True)
class Platform:
    """A target platform: ``budget`` in units of ``cost`` and a market ``weight`` in ``[0, 1]``.

    ``cost`` is ``"macs"`` (multiply-accumulates per image batch of the profile's input size),
    ``"params"``, ``"peak_activation"`` (bytes, the largest live activation set) or ``"latency"``
    (seconds, from a fitted latency table).
    """

    name: str
    budget: float
    weight: float = 1.0
    cost: str = "macs"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Platform name must be a non-empty string, got {self.name!r}")
        for what, v in (("budget", self.budget), ("weight", self.weight)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"platform {self.name!r}: {what} must be a finite number, got {v!r}")
        if self.budget <= 0:
            raise ValueError(f"platform {self.name!r}: budget must be > 0, got {self.budget}")
        if not 0 <= self.weight <= 1:
            raise ValueError(f"platform {self.name!r}: weight must be in [0, 1], got {self.weight}")
        if self.cost not in COSTS:
            raise ValueError(f"platform {self.name!r}: cost must be one of {COSTS}, got {self.cost!r}")


def check_platforms(platforms, require_weights: bool = True, tol: float = 1e-6) -> list[Platform]:
    """Validates a platform list: non-empty, ``Platform`` items, unique names, one cost kind and
    (with ``require_weights``) weights summing to 1."""
    if isinstance(platforms, Platform):
        platforms = [platforms]
    try:
        platforms = list(platforms)
    except TypeError:
        raise TypeError(f"platforms must be a list of Platform, got {type(platforms).__name__}") from None
    if not platforms:
        raise ValueError("the platform list is empty: give at least one Platform(name, budget, weight)")
    for p in platforms:
        if not isinstance(p, Platform):
            raise TypeError(f"platforms must be Platform objects, got {type(p).__name__}: {p!r}")
    names = [p.name for p in platforms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"platform names must be unique; repeated: {dup}")
    kinds = sorted({p.cost for p in platforms})
    if len(kinds) > 1:
        raise ValueError(f"all platforms of one search must use the same cost kind, got {kinds}")
    if require_weights:
        total = sum(p.weight for p in platforms)
        if abs(total - 1.0) > tol:
            raise ValueError(f"platform weights must sum to 1, got {total:.6g} "
                             f"({', '.join(f'{p.name}={p.weight:g}' for p in platforms)})")
    return platforms
