"""Server-side aggregation of sliced client updates into the shared full parameters.

Every rule (``slimkern.fl.rules``, one class a file, its formula in ``combine``; the
functions ``fedavg``, ``heterofl``, ... of this module are those ``combine``) is one formula over *index windows*: a client that trained switch ``s``
touched, in each full parameter ``W``, the windows ``parameter_ranges(net, s)[name]``
(one per branch; a ParaDiS branch of a conv is the diagonal block ``W[out_b, in_b]``).
With ``n_k`` the sample count of client ``k`` and ``T_k`` the set of elements it trained,

    W_new[e] = sum_{k: e in T_k} w_k * W_k[e] / sum_{k: e in T_k} w_k     if some k trained e
    W_new[e] = W_old[e]                                                   otherwise,

with ``w_k = n_k`` (``weighting="samples"``, FedAvg, FjORD, ParaDiS) or ``w_k = 1``
(``weighting="clients"``, the per-element count mean of HeteroFL's and FedRolex's
reference code). The rules differ in *which* elements the clients train (and so in what
the simulation asks of them) and in their default weighting; each rule's ``combine`` checks
its own precondition. A window may be a tuple of index tensors (FedRolex's index sets,
label split: ``slimkern.fl.rolex``); ``W[window]`` is then the dense gather.

Vectorised: the elements a switch trains are a fixed set of positions in the
concatenation of all full parameters (a ``Layout``, computed once per switch and cached).
A client update is the flat vector of those elements. The updates of one switch are
summed with one fused multiply-add per client over *all* its elements (``total += n_k v_k``,
a cache-resident accumulator), then scattered with one ``index_add_`` per switch into a
full-size sum and weight-count buffer; the division runs once at the end. There is no
Python loop over parameters, windows or elements. (Stacking the clients into a ``[K, P]``
matrix and reducing with one ``n @ V`` product was measured 2-3x slower on CPU: it writes
and re-reads the whole matrix, while the axpy streams each update once.)

BN statistics: only trainable parameters travel (weights, biases, BN affine ``gamma`` /
``beta``). Running means/variances never travel in either direction -- they are per
switch, depend on the client's data, and are meaningless for the averaged weights --
the server recomputes them for every switch it evaluates by calibrating on server-side
data (``slimkern.calibrate_bn``), as HeteroFL's "static batch normalization" does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from slimkern.fl import validate as _validate

__all__ = [
    "ClientUpdate", "Layout", "Aggregator", "AggregationReport", "UpdateRejected",
    "fedavg", "heterofl", "fedrolex", "fjord", "paradis", "clustered",
    "average", "rolling_window", "aggregate_loop",
]

Window = tuple  # tuple of slices, one per leading dimension indexed
WindowsFn = Callable[[Hashable], Mapping[str, Sequence[Window]]]


class UpdateRejected(ValueError):
    """A client update that cannot enter the average; ``str()`` is the logged reason."""


@dataclass
class ClientUpdate:
    """What one client sends back after local training.

    ``values`` is one of
      * a 1-D tensor: the trained elements in the order of ``Aggregator.layout(switch)``
        (what ``Aggregator.extract`` produces; the wire format of the simulation);
      * a dict ``name -> list of tensors``, one per window of
        ``windows(switch)[name]`` (a single tensor is accepted for a one-window parameter);
      * a dict ``name -> full-size tensor`` together with ``mask`` (``name -> bool tensor``
        of the same shape marking the trained elements), for rules whose trained set is
        not a union of windows.
    """
    client: int
    switch: Hashable
    values: Any
    num_samples: float
    mask: Mapping[str, torch.Tensor] | None = None
    # per-width BN running statistics (``FjORD(bn="travel")``, ``slimkern.fl.fjord_bn``);
    # the Aggregator does not average them
    stats: Any = None

    @property
    def num_examples(self) -> float:
        """Flower's name of ``num_samples``."""
        return self.num_samples


@dataclass
class AggregationReport:
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    updated_elements: int = 0

    @property
    def empty(self) -> bool:
        return not self.accepted

    def summary(self) -> str:
        if self.empty:
            return (f"no update accepted ({len(self.rejected)} rejected): "
                    "the model is left unchanged")
        return (f"{len(self.accepted)} updates accepted, {len(self.rejected)} rejected, "
                f"{self.updated_elements} elements updated")


class Layout:
    """Flat positions (in the concatenation of all full parameters) that a switch trains.

    Windows that repeat elements (e.g. a bias listed by every branch) are counted once:
    the first window that names an element owns its place in the flat vector. A sliced
    update sends one copy per window; ``pack`` averages the copies of a repeated element
    (conflicting copies of a ParaDiS switch's shared classifier bias are averaged, never
    dropped).
    """

    def __init__(self, shapes: Mapping[str, torch.Size], offsets: Mapping[str, int],
                 windows: Mapping[str, Sequence[Window]]):
        # names not in ``shapes`` (BN running statistics) have windows too; they do not travel
        self.pieces: list[tuple[str, Window, torch.Size, torch.Tensor | None]] = []
        # (piece, positions in the piece, positions in the flat vector) of repeated elements
        self.repeats: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        index = []
        cursor = 0
        for name, shape in shapes.items():
            wins = windows.get(name, ())
            if not wins:
                continue
            numel = math.prod(shape)
            positions = torch.arange(numel).view(shape)
            taken = torch.zeros(numel, dtype=torch.bool)
            slot = torch.full((numel,), -1, dtype=torch.long)  # element -> place in the flat vector
            for win in wins:
                win = tuple(win) if isinstance(win, (tuple, list)) else (win,)
                try:
                    pos = positions[win]
                except (IndexError, TypeError) as exc:
                    raise ValueError(f"window {win} does not index parameter {name!r} of shape "
                                     f"{tuple(shape)}: {exc}") from None
                flat = pos.reshape(-1)
                fresh = ~taken[flat]
                keep = None if bool(fresh.all()) else fresh.nonzero().flatten()
                if keep is not None:
                    dup = (~fresh).nonzero().flatten()
                    self.repeats.append((len(self.pieces), dup, slot[flat[dup]]))
                taken[flat] = True
                self.pieces.append((name, win, pos.shape, keep))
                owned = flat if keep is None else flat[keep]
                slot[owned] = torch.arange(cursor, cursor + owned.numel())
                cursor += owned.numel()
                index.append(owned + offsets[name])
        self.index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        self.numel = int(self.index.numel())

    def _plan(self):
        """Per parameter: (name, number of windows); flat lists of shapes and keeps."""
        if not hasattr(self, "_counts"):
            counts: dict[str, int] = {}
            for name, *_ in self.pieces:
                counts[name] = counts.get(name, 0) + 1
            self._counts = list(counts.items())
            self._shapes = [shape for _, _, shape, _ in self.pieces]
            self._keeps = [(i, keep) for i, (_, _, _, keep) in enumerate(self.pieces) if keep is not None]
        return self._counts, self._shapes, self._keeps

    def pack(self, sliced: Mapping[str, Any], out: torch.Tensor | None = None) -> torch.Tensor:
        """``name -> [tensor per window]`` into the flat vector (written into ``out`` when
        given, e.g. a reused buffer); raises UpdateRejected naming the first bad entry."""
        counts, shapes, keeps = self._plan()
        tensors: list = []
        for name, n in counts:
            got = sliced.get(name) if isinstance(sliced, Mapping) else None
            if got is None:
                missing = [m for m, _ in counts if m not in sliced]
                raise UpdateRejected(f"missing parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
            if isinstance(got, torch.Tensor):
                got = (got,)
            if len(got) != n:
                raise UpdateRejected(f"parameter {name!r}: {len(got)} windows sent, expected {n}")
            tensors.extend(got)
        # checks in bulk (one comparison of shape lists), details only on failure
        try:
            ok = [t.shape for t in tensors] == shapes and all(t.is_floating_point() for t in tensors)
        except AttributeError:
            ok = False
        if not ok:
            for (name, _, shape, _), t in zip(self.pieces, tensors):
                if not isinstance(t, torch.Tensor):
                    raise UpdateRejected(f"parameter {name!r}: a window is a {type(t).__name__}, not a tensor")
                if t.shape != shape:
                    raise UpdateRejected(f"parameter {name!r}: window has shape {tuple(t.shape)}, "
                                         f"expected {tuple(shape)}")
                if not t.is_floating_point():
                    raise UpdateRejected(f"parameter {name!r}: values must be floating point, got {t.dtype}")
        parts = [t.reshape(-1) for t in tensors]
        for i, keep in reversed(keeps):  # windows repeated by several branches: first one owns
            if keep.numel():
                parts[i] = parts[i][keep]
            else:
                del parts[i]
        if out is None:
            out = torch.cat(parts) if parts else torch.zeros(0)
        elif parts:
            torch.cat(parts, out=out)
        if self.repeats:
            self._average_repeats(out, tensors)
        return out

    def _average_repeats(self, flat: torch.Tensor, tensors: list) -> None:
        """Each repeated element of ``flat`` (holding its first copy) becomes the mean of
        all the copies sent in ``tensors`` (one tensor per piece)."""
        if not hasattr(self, "_rep_pos"):
            mult = torch.ones(self.numel, dtype=torch.float64)
            for _, _, dst in self.repeats:
                mult.index_add_(0, dst, torch.ones(dst.numel(), dtype=torch.float64))
            self._rep_pos = torch.unique(torch.cat([dst for _, _, dst in self.repeats]))
            self._rep_mult = mult[self._rep_pos]
        for i, src, dst in self.repeats:
            if src.numel():
                flat.index_add_(0, dst, tensors[i].detach().reshape(-1)[src].to(flat.dtype))
        flat[self._rep_pos] = flat[self._rep_pos] / self._rep_mult.to(flat.dtype)


class Aggregator:
    """The vectorised element-wise weighted average over index windows (module docstring).

    ``shapes``: the full trainable parameters (``name -> shape``), in a fixed order.
    ``windows``: ``switch -> {name: [window, ...]}`` -- a callable (normally
    ``lambda sw: slimkern.nn.parameter_ranges(net, sw)``) or a dict.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], windows: WindowsFn | Mapping):
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.offsets: dict[str, int] = {}
        total = 0
        for n, s in self.shapes.items():
            self.offsets[n] = total
            total += math.prod(s)
        self.total = total
        if callable(windows):
            self._windows_fn = windows
        elif isinstance(windows, Mapping):
            self._windows_fn = windows.__getitem__
        else:
            raise TypeError("windows must be a callable switch -> {name: windows} or a dict of those")
        self._layouts: dict[Hashable, Layout] = {}
        # packing buffer for sliced-dict updates, reused across clients and rounds
        self._buf: torch.Tensor | None = None
        # sample counts above this are rejected (validate.MAX_NUM_SAMPLES; None: no bound)
        self.max_num_samples: float | None = _validate.MAX_NUM_SAMPLES
        self._acc64 = False  # set by validate.overflowed to redo an overflowed mean in float64

    def _buffer(self, rows: int, cols: int, dtype) -> torch.Tensor:
        need = rows * cols
        if self._buf is None or self._buf.numel() < need or self._buf.dtype != dtype:
            self._buf = torch.empty(need, dtype=dtype)
        return self._buf[:need].view(rows, cols)

    @classmethod
    def for_params(cls, params: Mapping[str, torch.Tensor], windows) -> "Aggregator":
        return cls({n: p.shape for n, p in params.items()}, windows)

    # -- layouts and conversions -------------------------------------------------------
    def layout(self, switch: Hashable) -> Layout:
        lay = self._layouts.get(switch)
        if lay is None:
            lay = Layout(self.shapes, self.offsets, self._windows_fn(switch))
            self._layouts[switch] = lay
        return lay

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.shapes if n not in params]
        if missing:
            raise KeyError(f"parameters missing: {missing[:5]}")
        return torch.cat([params[n].detach().reshape(-1) for n in self.shapes])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[o:o + math.prod(s)].view(s) for (n, s), o in zip(self.shapes.items(), self.offsets.values())}

    def extract(self, params: Mapping[str, torch.Tensor] | torch.Tensor, switch: Hashable) -> torch.Tensor:
        """The flat vector of the elements ``switch`` trains (what the client sends)."""
        flat = params if isinstance(params, torch.Tensor) else self.flatten(params)
        return flat[self.layout(switch).index].clone()

    def extract_sliced(self, params: Mapping[str, torch.Tensor], switch: Hashable) -> dict[str, list[torch.Tensor]]:
        """``name -> [W[window] for each window]`` (the dict form of an update)."""
        out: dict[str, list[torch.Tensor]] = {}
        for name, win, _, _ in self.layout(switch).pieces:
            out.setdefault(name, []).append(params[name].detach()[win].clone())
        return out

    def num_elements(self, switch: Hashable) -> int:
        """Elements that travel for ``switch`` (each direction)."""
        return self.layout(switch).numel

    # -- validation ----------------------------------------------------------------------
    def _masked(self, u: ClientUpdate) -> tuple[torch.Tensor, torch.Tensor]:
        """Full flat values and mask of a masked update; raises UpdateRejected."""
        if not isinstance(u.values, Mapping) or not isinstance(u.mask, Mapping):
            raise UpdateRejected("a masked update needs dicts of full-size tensors and masks")
        vals, masks = [], []
        for name, shape in self.shapes.items():
            v, m = u.values.get(name), u.mask.get(name)
            if v is None and m is None:
                vals.append(torch.zeros(math.prod(shape)))
                masks.append(torch.zeros(math.prod(shape), dtype=torch.bool))
                continue
            if v is None or m is None:
                raise UpdateRejected(f"parameter {name!r}: value and mask must come together")
            if v.shape != shape or m.shape != shape:
                raise UpdateRejected(f"parameter {name!r}: shapes {tuple(v.shape)}/{tuple(m.shape)}, "
                                     f"expected full shape {tuple(shape)}")
            if not v.is_floating_point():
                raise UpdateRejected(f"parameter {name!r}: values must be floating point, got {v.dtype}")
            vals.append(v.detach().reshape(-1).float())
            masks.append(m.reshape(-1).bool())
        return torch.cat(vals), torch.cat(masks)

    def _vector(self, u: ClientUpdate, lay: Layout, row: torch.Tensor) -> torch.Tensor:
        """The flat values of a window update: the update's own tensor, or its sliced dict
        packed into ``row`` (a reused buffer); raises UpdateRejected."""
        if isinstance(u.values, torch.Tensor):
            if u.values.dim() != 1 or u.values.numel() != lay.numel:
                raise UpdateRejected(f"expected a flat vector of {lay.numel} values for switch {u.switch}, "
                                     f"got shape {tuple(u.values.shape)}")
            if not u.values.is_floating_point():
                raise UpdateRejected(f"values must be floating point, got {u.values.dtype}")
            return u.values.detach().to(row.dtype)
        if isinstance(u.values, Mapping):
            with torch.no_grad():
                return lay.pack(u.values, out=row)
        raise UpdateRejected(f"values must be a tensor or a dict, got {type(u.values).__name__}")

    def check(self, u: ClientUpdate, assigned: Mapping[int, Hashable] | None = None) -> str | None:
        """The reason ``u`` must be rejected, or None."""
        if assigned is not None:
            if u.client not in assigned:
                return f"client {u.client} was not selected this round"
            if u.switch != assigned[u.client]:
                return f"client {u.client} sent switch {u.switch} but was assigned {assigned[u.client]}"
        return _validate.sample_count_problem(u.num_samples, self.max_num_samples)

    # -- the average ---------------------------------------------------------------------
    def aggregate(self, params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                  assigned: Mapping[int, Hashable] | None = None, log: Callable[[str], None] | None = None,
                  weighting: str = "samples") -> tuple[dict[str, torch.Tensor], AggregationReport]:
        """New full parameters (fresh tensors) and a report of accepted/rejected clients.

        ``weighting``: ``"samples"`` weights client ``k`` by ``n_k`` (FedAvg); ``"clients"``
        by 1, so each element is the plain mean over the clients that trained it (HeteroFL's
        ``combine``: ``count += 1``). Sample counts are validated either way.

        Rejected (with the reason in the report and passed to ``log``): a switch other than
        the one ``assigned`` to the client, a client not in ``assigned``, a second update
        from the same client, wrong shapes or lengths, non-floating values, NaN/inf values,
        non-positive sample counts. Elements no accepted client trained keep their value.
        """
        old = self.flatten(params)
        report = AggregationReport()
        acc_dtype = torch.float64 if old.dtype == torch.float64 or self._acc64 else torch.float32
        acc = torch.zeros(self.total, dtype=acc_dtype)
        cnt = torch.zeros(self.total, dtype=acc_dtype)
        if weighting not in ("samples", "clients"):
            raise ValueError(f"weighting must be 'samples' or 'clients', got {weighting!r}")

        def weight(u: ClientUpdate) -> float:
            return float(u.num_samples) if weighting == "samples" else 1.0

        def reject(u: ClientUpdate, why: str) -> None:
            report.rejected.append((u.client, why))
            if log is not None:
                log(f"rejected update of client {u.client}: {why}")

        groups: dict[Hashable, list[ClientUpdate]] = {}
        masked: list[tuple[ClientUpdate, torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for u in updates:
            why = self.check(u, assigned)
            if why is None and u.client in seen:
                why = f"client {u.client} sent more than one update"
            if why is None and u.mask is not None:
                try:
                    masked.append((u, *self._masked(u)))
                except UpdateRejected as exc:
                    why = str(exc)
            elif why is None:
                try:
                    self.layout(u.switch)
                    groups.setdefault(u.switch, []).append(u)
                except (KeyError, ValueError, TypeError) as exc:
                    why = f"switch {u.switch} cannot be laid out: {exc}"
            if why is not None:
                reject(u, why)
                continue
            seen.add(u.client)

        for switch, items in groups.items():
            lay = self.layout(switch)
            row = self._buffer(1, lay.numel, acc_dtype)[0]
            total = torch.zeros(lay.numel, dtype=acc_dtype)
            good: list[ClientUpdate] = []
            for u in items:
                try:
                    vec = self._vector(u, lay, row)
                except UpdateRejected as exc:
                    reject(u, str(exc))
                    continue
                total.add_(vec, alpha=weight(u))
                good.append(u)
            # NaN/inf in any update reaches the weighted sum (weights > 0): only then look
            # at clients one by one and redo the sum without the poisoned ones
            if not bool(torch.isfinite(total).all()):
                total.zero_()
                clean = []
                for u in good:
                    vec = self._vector(u, lay, row)
                    if not bool(torch.isfinite(vec).all()):
                        reject(u, f"non-finite values ({int(torch.isnan(vec).sum())} NaN, "
                                  f"{int(torch.isinf(vec).sum())} inf)")
                        continue
                    total.add_(vec, alpha=weight(u))
                    clean.append(u)
                good = clean
            if not good:
                continue
            wsum = sum(weight(u) for u in good)
            acc.index_add_(0, lay.index, total)
            cnt.index_add_(0, lay.index, torch.full((lay.numel,), wsum, dtype=acc_dtype))
            report.accepted.extend(u.client for u in good)
        for u, v, m in masked:
            if not bool(torch.isfinite(v[m]).all()):
                reject(u, "non-finite values in the trained elements")
                continue
            w = weight(u)
            acc.add_(torch.where(m, v.to(acc_dtype), 0.0), alpha=w)
            cnt.add_(m.to(acc_dtype), alpha=w)
            report.accepted.append(u.client)
        report.accepted.sort()

        trained = cnt > 0
        report.updated_elements = int(trained.sum())
        if report.empty and log is not None:
            log(report.summary())
        new = torch.where(trained, acc / cnt.clamp_min(1e-30), old.to(acc_dtype)).to(old.dtype)
        if not bool((torch.isfinite(new) | ~trained).all()):  # overflow of finite updates
            return _validate.overflowed(self, params, updates, assigned, log, report, acc_dtype,
                                       weighting=weighting)
        return {n: t.clone() for n, t in self.unflatten(new).items()}, report


# -- the shared average; the rules' own formulas live in slimkern.fl.rules ----------------

def average(params, updates, windows, assigned=None, log=None, pre=(), weighting="samples"):
    """The element-wise weighted mean of ``updates`` over their windows (module docstring):
    ``windows`` is an ``Aggregator`` or a ``switch -> windows`` callable / dict; ``pre`` are
    rejections a rule made before it (``(client, reason)``, already logged), listed first in
    the report. Returns ``(params, AggregationReport)``."""
    agg = windows if isinstance(windows, Aggregator) else Aggregator.for_params(params, windows)
    new, rep = agg.aggregate(params, updates, assigned=assigned, log=log, weighting=weighting)
    if pre:
        rep.rejected[:0] = list(pre)
    return new, rep


# the one-shot rule functions ``fedavg(params, updates, windows, assigned, log, weighting)``,
# ...: each is the ``combine`` of its rule class (one formula, one place)
_RULE_FUNCTIONS = ("fedavg", "heterofl", "fedrolex", "fjord", "paradis", "clustered")


def __getattr__(name: str):
    if name in _RULE_FUNCTIONS:
        from slimkern.fl.rules import RULES
        return RULES[name].combine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rolling_window(width: float, round_index: int, step: float, max_width: float = 1.0
                   ) -> list[tuple[float, float]]:
    """A rolling window of ``width`` in round ``round_index`` as fractions: one ``(start,
    stop)`` range, or two when it wraps past ``max_width`` (the tail ``[s, max)`` first, then
    ``[0, rest)``). Kept for users of switch ranges; FedRolex itself trains the dense
    index-set sub-model of its reference code (``slimkern.fl.rolex``), not these ranges."""
    if not 0 < width <= max_width:
        raise ValueError(f"width must be in (0, {max_width}], got {width}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # snap to a 1e-9 grid so that float round-off never produces a sliver range
    if width == max_width:
        return [(0.0, max_width)]
    start = round((round_index * step) % max_width, 9)
    if start >= max_width:
        start = 0.0
    stop = round(start + width, 9)
    if stop <= max_width:
        return [(start, stop)]
    return [(start, max_width), (0.0, round(stop - max_width, 9))]


def aggregate_loop(params: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                   windows: WindowsFn) -> dict[str, torch.Tensor]:
    """The straightforward reference: per client, per parameter, per window, accumulate.
    Same result as ``Aggregator.aggregate`` (sliced-dict updates, no validation) when the
    windows of one switch are disjoint or repeated exactly (a switch's branches are
    disjoint; a window listed by several branches, the bias, takes the mean of the copies
    and counts once); kept for tests and as the benchmark baseline."""
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    cnt = {n: torch.zeros_like(p) for n, p in params.items()}
    for u in updates:
        wins = windows(u.switch)
        for name in params:
            got = u.values.get(name) if isinstance(u.values, Mapping) else None
            if got is None:
                continue
            tensors = [got] if isinstance(got, torch.Tensor) else got
            seen: list = []
            copies: list[list] = []
            for win, t in zip(wins[name], tensors):
                if win in seen:  # a window listed by several branches (the bias): average the copies
                    copies[seen.index(win)].append(t)
                    continue
                seen.append(win)
                copies.append([t])
            for win, ts in zip(seen, copies):
                t = ts[0] if len(ts) == 1 else sum(ts) / len(ts)
                acc[name][win] += t * u.num_samples
                cnt[name][win] += float(u.num_samples)
    return {n: torch.where(cnt[n] > 0, acc[n] / cnt[n].clamp_min(1e-30), params[n]) for n in params}
