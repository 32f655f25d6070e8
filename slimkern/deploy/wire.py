"""Tensors over a ``multiprocessing`` connection (a local socket pair): a small header and the
raw bytes, no pickling on the hot path.

Message: ``<B kind><B dtype code><B ndim><ndim x int64 shape><data>``; kind 1 = tensor,
0 = stop (no payload), 2 = error (payload: UTF-8 text).
"""
from __future__ import annotations

import struct

import torch

KIND_STOP, KIND_TENSOR, KIND_ERROR = 0, 1, 2
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)
_CODE = {d: i for i, d in enumerate(_DTYPES)}


def encode(t: torch.Tensor) -> bytes:
    """``t`` (CPU, one of the supported dtypes) as one message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"encode: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _CODE:
        raise ValueError(f"encode: dtype {t.dtype} is not supported (use one of {list(_CODE)})")
    t = t.detach().cpu().contiguous()
    head = struct.pack(f"<BBB{t.dim()}q", KIND_TENSOR, _CODE[t.dtype], t.dim(), *t.shape)
    # bfloat16 has no numpy dtype: its bytes travel as int16
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return head + raw.numpy().tobytes()


def decode(msg: bytes) -> tuple[int, torch.Tensor | str | None]:
    """``(kind, payload)``: a tensor for KIND_TENSOR, the text for KIND_ERROR, None for KIND_STOP."""
    kind = msg[0]
    if kind == KIND_STOP:
        return kind, None
    if kind == KIND_ERROR:
        return kind, msg[1:].decode("utf-8", "replace")
    if kind != KIND_TENSOR:
        raise ValueError(f"decode: unknown message kind {kind}")
    code, ndim = msg[1], msg[2]
    shape = struct.unpack_from(f"<{ndim}q", msg, 3)
    dtype = _DTYPES[code]
    buf = bytearray(msg[3 + 8 * ndim:])
    if dtype == torch.bfloat16:
        return kind, torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return kind, torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


def stop_message() -> bytes:
    return bytes([KIND_STOP])


def error_message(text: str) -> bytes:
    return bytes([KIND_ERROR]) + text.encode("utf-8")
