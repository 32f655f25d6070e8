"""Costs of a federated method per tier: inference MACs and parameters (``slimkern.profile``),
and a client's training memory measured on one local step.

Training memory = the bytes of every tensor autograd saves for the backward of one local
step at the client's batch size (``torch.autograd.graph.saved_tensors_hooks``, distinct
storages counted once; the packed nested switches of ParaDiS included; tensors that are
views of the net's parameters left out -- a slim layer saves a view of its full weight, of
which a real client holds only its slice), plus the client's trained parameters three times
(weights, gradients, SGD momentum). It is what the step must
hold at its peak, independent of the allocator; the input batch and the loss are left out.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

__all__ = ["saved_tensor_bytes", "training_memory", "inference_cost"]


def saved_tensor_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs a forward pass,
    leaving out the storages of the tensors in ``exclude`` (parameters, counted apart)."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return int(sum(seen.values()))


def training_memory(net, rule, switch, batch_size: int, input_shape, num_params: int, num_classes: int = 10) -> int:
    """Peak bytes of one local step of ``rule`` at ``switch`` (module docstring)."""
    from slimkern.nn import forward_switches, use_switch
    x = torch.randn(batch_size, *input_shape)
    y = torch.arange(batch_size) % num_classes
    net.train()
    sws = rule.step_switches(switch, random.Random(0))

    def step():
        with rule.local_context(net, switch):
            if len(sws) == 1:
                with use_switch(net, sws[0]):
                    return F.cross_entropy(net(x), y)
            outs = forward_switches(net, x, sws)
            return sum(F.cross_entropy(o, y) for o in outs)

    act = saved_tensor_bytes(step, exclude=list(net.parameters()))
    elsize = next(net.parameters()).element_size()
    return act + 3 * int(num_params) * elsize


def inference_cost(net, switch, input_shape) -> tuple[int, int]:
    """``(MACs, parameters)`` of one input at ``switch`` (``slimkern.profile``)."""
    from slimkern.profile import profile
    p = profile(net, switch, input_size=(1, *input_shape))
    return int(p.macs), int(p.params)
