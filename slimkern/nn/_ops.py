"""Picks ``slimkern.ops.<name>`` when that op exists, else the pure-torch fallback."""
from __future__ import annotations

from slimkern.nn import _fallback


def op(name: str):
    from slimkern import ops
    f = getattr(ops, name, None)
    return f if f is not None else getattr(_fallback, name)
