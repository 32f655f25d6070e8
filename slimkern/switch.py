"""``Switch``: which channels of a slimmable / ParaDiS network run.

A switch is an immutable, hashable value: a tuple of *branches*, each a half-open range
``[lo, hi)`` of fractions of the base (1.0x) width of every sliced layer.

* ``Switch([1.0])`` is the base network, ``Switch([0.25])`` a slimmable sub-network
  (Yu et al., "Slimmable Neural Networks", ICLR 2019), ``Switch([1.2])`` the wide teacher of
  a net built with ``max_width=1.2``.
* ``Switch([0.5, 0.25, 0.25])`` is a ParaDiS switch (Ozerov et al.): three parallel
  branches on disjoint, consecutive channel ranges ``[0,.5), [.5,.75), [.75,1)``, fused only
  at the output (partial logits summed).
* ``Switch.ranges([(0.25, 0.75)])`` is an offset window (FedRolex-style rolling sub-models).
* ``Switch.from_channels({"group": (8, 8), ...})`` gives explicit per-layer channel counts
  (a width search's result). Layers carry a channel *group* name (``in_group``/``out_group``);
  a per-layer switch must name every group of the net it runs on.

Channels come from fractions by rounding the *cumulative* boundaries,
``c(f) = d * floor(f * C / d + 1/2)`` for divisor ``d`` (half rounds up, unlike Python's
banker's ``round``), so the branches of a switch tile a layer exactly and every module,
the exporter and the federated server agree on the same ranges (``channel_ranges``).

Notation (the paper's): ``"[0.5, 0.25, 0.25]x"``; ``"[4x0.25]x"`` repeats a width;
``"0.5x"`` is ``"[0.5]x"``; an element ``"a:b"`` is an explicit range (offset windows), later
plain widths continue from its end. Per-layer switches print as
``"{stem: [8, 8], b1: [16, 16]}ch"``. ``Switch.parse(str(sw)) == sw`` always.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Sequence

__all__ = ["Switch"]

# Fractions are stored rounded to this many decimals so that Switch([0.1, 0.2]) and
# Switch.ranges([(0, .1), (.1, .3)]) are equal and str() round-trips despite float sums.
_DIGITS = 10


def _clean(f: float) -> float:
    return round(float(f), _DIGITS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _fmt(f: float) -> str:
    return repr(_clean(f))


def round_channels(fraction: float, channels: int, divisor: int = 1) -> int:
    """Channel boundary for a width fraction: ``d * floor(f * C / d + 1/2)``."""
    return divisor * int(math.floor(fraction * channels / divisor + 0.5 + 1e-9))


class Switch:
    """An immutable, hashable set of branches (see the module docstring).

    Args:
        widths: branch widths as fractions of the base width; branches are consecutive
            from 0: ``Switch([0.5, 0.5])`` runs ``[0, .5)`` and ``[.5, 1)``.
    """

    __slots__ = ("_branches", "_channels", "_hash")

    def __init__(self, widths: Sequence[float] | float):
        if isinstance(widths, (int, float)) and not isinstance(widths, bool):
            widths = [widths]
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
            raise TypeError(f"Switch(widths) takes a list of width fractions, got {widths!r}; "
                            "use Switch.parse for strings")
        widths = list(widths)
        branches, lo = [], 0.0
        for w in widths:
            w = _number(w, "branch width")
            branches.append((lo, lo + w))
            lo += w
        self._init(branches, None)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def width(cls, w: float) -> "Switch":
        """The one-branch slimmable switch ``[0, w)``: ``Switch.width(0.25) == Switch([0.25])``."""
        return cls([w])

    @classmethod
    def ranges(cls, ranges: Sequence[tuple[float, float]]) -> "Switch":
        """Branches given as explicit ``(lo, hi)`` fraction ranges (offset windows allowed)."""
        sw = cls.__new__(cls)
        try:
            rs = [(_number(a, "range start"), _number(b, "range stop")) for a, b in ranges]
        except (TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "must be" in str(e):
                raise
            raise TypeError(f"Switch.ranges takes a list of (lo, hi) pairs, got {ranges!r}") from None
        sw._init(rs, None)
        return sw

    @classmethod
    def from_channels(cls, channels: Mapping[str, int | Sequence[int]]) -> "Switch":
        """Per-layer channel counts, e.g. from a width search.

        ``channels`` maps a layer's channel group name (a module's ``out_group``) to the
        number of channels of each branch (an int for one branch); branches are consecutive
        from channel 0. Every group must have the same number of branches. The counts are
        used as given (no divisor); layers check they fit in their full width.
        """
        if not isinstance(channels, Mapping) or not channels:
            raise ValueError("Switch.from_channels needs a non-empty mapping {group name: channels}")
        entries, nb = [], None
        for name, counts in channels.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
                raise ValueError(f"group name {name!r} must be an identifier (letters, digits, _ or .)")
            if isinstance(counts, int) and not isinstance(counts, bool):
                counts = (counts,)
            counts = tuple(counts)
            if any(not isinstance(c, int) or isinstance(c, bool) for c in counts):
                raise TypeError(f"group {name!r}: channel counts must be ints, got {counts!r}")
            if not counts or any(c <= 0 for c in counts):
                raise ValueError(f"group {name!r}: every branch needs at least one channel, got {list(counts)}")
            if nb is not None and len(counts) != nb:
                raise ValueError(f"group {name!r} has {len(counts)} branches but others have {nb}: "
                                 "every group of a per-layer switch must have the same number of branches")
            nb = len(counts)
            bounds, lo = [], 0
            for c in counts:
                bounds.append((lo, lo + c))
                lo += c
            entries.append((name, tuple(bounds)))
        sw = cls.__new__(cls)
        sw._branches = None
        sw._channels = tuple(sorted(entries))
        sw._hash = hash(("ch", sw._channels))
        return sw

    @classmethod
    def parse(cls, text: str) -> "Switch":
        """Parse the paper's notation: ``"[0.5, 0.25, 0.25]x"``, ``"[4x0.25]x"``, ``"0.5x"``,
        ``"[0.25:0.75]x"`` (offset window), ``"{stem: [8, 8]}ch"`` (per-layer channels)."""
        if isinstance(text, Switch):
            return text
        if not isinstance(text, str):
            raise TypeError(f"Switch.parse takes a string, got {type(text).__name__}")
        s = text.strip()
        if s.endswith("ch") and s.startswith("{"):
            return cls._parse_channels(text, s[:-2].strip())
        if not s.endswith("x"):
            raise ValueError(f"cannot parse switch {text!r}: expected e.g. '[0.5, 0.5]x', '[4x0.25]x', "
                             "'0.5x' or '{group: [8, 8]}ch' (missing the trailing 'x')")
        body = s[:-1].strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        elif "," in body or ":" in body:
            raise ValueError(f"cannot parse switch {text!r}: a list of branches needs brackets, e.g. '[0.5, 0.5]x'")
        if not body.strip():
            raise ValueError(f"cannot parse switch {text!r}: no branches")
        branches, lo = [], 0.0
        for item in body.split(","):
            item = item.strip()
            try:
                if ":" in item:
                    a, b = item.split(":")
                    a, b = float(a), float(b)
                    branches.append((a, b))
                    lo = b
                elif "x" in item:
                    k, w = item.split("x")
                    k, w = int(k), float(w)
                    if k <= 0:
                        raise ValueError
                    for _ in range(k):
                        branches.append((lo, lo + w))
                        lo += w
                else:
                    w = float(item)
                    branches.append((lo, lo + w))
                    lo += w
            except ValueError:
                raise ValueError(f"cannot parse switch {text!r}: bad branch {item!r} (expected a width "
                                 "like 0.25, a repetition like 4x0.25, or a range like 0.25:0.75)") from None
        sw = cls.__new__(cls)
        sw._init(branches, None)
        return sw

    @classmethod
    def _parse_channels(cls, text: str, body: str) -> "Switch":
        inner = body[1:-1] if body.endswith("}") else None
        if inner is None:
            raise ValueError(f"cannot parse switch {text!r}: missing '}}'")
        out = {}
        for m in re.finditer(r"\s*([^:,\s]+)\s*:\s*(\[[^\]]*\]|\d+)\s*(,|$)", inner):
            name, val = m.group(1), m.group(2)
            if val.startswith("["):
                try:
                    out[name] = [int(v) for v in val[1:-1].split(",") if v.strip()]
                except ValueError:
                    raise ValueError(f"cannot parse switch {text!r}: bad channel list {val!r}") from None
            else:
                out[name] = int(val)
        rebuilt = re.sub(r"\s*([^:,\s]+)\s*:\s*(\[[^\]]*\]|\d+)\s*(,|$)", "", inner)
        if rebuilt.strip() or not out:
            raise ValueError(f"cannot parse switch {text!r}: expected '{{group: [c1, c2], ...}}ch'")
        return cls.from_channels(out)

    def _init(self, branches, channels):
        bs = [(_clean(a), _clean(b)) for a, b in branches]
        if not bs:
            raise ValueError("a switch needs at least one branch")
        for i, (a, b) in enumerate(bs):
            if a < 0:
                raise ValueError(f"branch {i} starts below 0 ({a}): fractions are of the base width, >= 0")
            if b <= a:
                raise ValueError(f"branch {i} is empty: [{a}, {b}) (each branch needs a positive width)")
        order = sorted(range(len(bs)), key=lambda i: bs[i][0])
        for i, j in zip(order, order[1:]):
            if bs[j][0] < bs[i][1] - 10.0 ** -_DIGITS:
                raise ValueError(f"branches {i} [{bs[i][0]}, {bs[i][1]}) and {j} [{bs[j][0]}, {bs[j][1]}) "
                                 "overlap: the branches of one switch must be disjoint")
        self._branches = tuple(bs)
        self._channels = channels
        self._hash = hash(("fr", self._branches))

    # ---- value semantics ----------------------------------------------------------------
    def __setattr__(self, name, value):
        if name in Switch.__slots__ and not hasattr(self, "_hash"):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError("Switch is immutable")

    def __eq__(self, other):
        if not isinstance(other, Switch):
            return NotImplemented
        return self._branches == other._branches and self._channels == other._channels

    def __hash__(self):
        return self._hash

    def __lt__(self, other):  # a stable order for sorting (e.g. in reports)
        if not isinstance(other, Switch):
            return NotImplemented
        return str(self) < str(other)

    def __reduce__(self):
        return (Switch.parse, (str(self),))

    def __len__(self):
        return self.num_branches

    def __str__(self):
        if self._channels is not None:
            parts = [f"{n}: [{', '.join(str(b - a) for a, b in rs)}]" for n, rs in self._channels]
            return "{" + ", ".join(parts) + "}ch"
        items, prev = [], 0.0
        for a, b in self._branches:
            items.append(_fmt(b - a) if a == prev else f"{_fmt(a)}:{_fmt(b)}")
            prev = b
        return "[" + ", ".join(items) + "]x"

    def __repr__(self):
        return f"Switch.parse({str(self)!r})"

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return len(self._channels[0][1]) if self._channels is not None else len(self._branches)

    @property
    def branches(self) -> tuple[tuple[float, float], ...]:
        """The ``(lo, hi)`` fraction ranges (ValueError for per-layer channel switches)."""
        if self._branches is None:
            raise ValueError(f"{self} gives per-layer channel counts, not fractions")
        return self._branches

    @property
    def is_per_layer(self) -> bool:
        return self._channels is not None

    @property
    def groups(self) -> tuple[str, ...]:
        """Group names of a per-layer switch (empty for fraction switches)."""
        return tuple(n for n, _ in self._channels) if self._channels is not None else ()

    @property
    def max_fraction(self) -> float:
        """The largest fraction any branch reaches (the width the net must be built for)."""
        if self._channels is not None:
            raise ValueError(f"{self} gives per-layer channel counts, not fractions")
        return max(b for _, b in self._branches)

    @property
    def total_width(self) -> float:
        return sum(b - a for a, b in self.branches)

    def channel_ranges(self, channels: int, max_width: float = 1.0, divisor: int = 1,
                       group: str | None = None) -> list[tuple[int, int]]:
        """``(start, stop)`` channel ranges, one per branch, for a layer of ``channels`` base
        (1.0x) channels built for ``max_width``: boundaries ``d * floor(f * C / d + 1/2)``.

        For a per-layer switch the layer's ``group`` picks the counts. Raises ValueError when
        a branch reaches past ``max_width`` or rounds to no channels.
        """
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(divisor, int) or divisor <= 0:
            raise ValueError(f"divisor must be a positive int, got {divisor!r}")
        full = full_channels(channels, max_width, divisor)
        if self._channels is not None:
            if group is None:
                raise ValueError(f"per-layer switch {self} needs the layer's channel group, but the layer has "
                                 "none (set in_group/out_group, as slimmify does)")
            table = dict(self._channels)
            if group not in table:
                raise ValueError(f"per-layer switch {self} has no entry for channel group {group!r}")
            rs = list(table[group])
            if rs[-1][1] > full:
                raise ValueError(f"per-layer switch {self}: group {group!r} needs {rs[-1][1]} channels but the "
                                 f"layer has only {full} (base {channels}, max_width {max_width})")
            return rs
        out = []
        for i, (a, b) in enumerate(self._branches):
            if b > max_width + 1e-9:
                raise ValueError(f"switch {self}: branch {i} reaches {b}x, above the net's max_width {max_width}x")
            s, e = round_channels(a, channels, divisor), min(round_channels(b, channels, divisor), full)
            if e <= s:
                raise ValueError(f"switch {self}: branch {i} [{a}, {b}) has no channels in a layer of {channels} "
                                 f"base channels (divisor {divisor}); use wider branches")
            out.append((s, e))
        return out


def full_channels(channels: int, max_width: float = 1.0, divisor: int = 1) -> int:
    """The allocated width of a layer: ``round_channels(max_width, C, d)`` (at least C)."""
    return max(channels, round_channels(max_width, channels, divisor))


def _number(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numbers
            if isinstance(v, numbers.Real):
                return float(v)
        except Exception:  # pragma: no cover
            pass
        raise TypeError(f"{what} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, got {v!r}")
    return f
