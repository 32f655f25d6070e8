"""Independent element-set and mean computations for the federated-rule tests.

Nothing here calls slimkern's window code: the channel roles of SmallCNN's parameters are
written out from its architecture, the index sets come from the reference definitions

* HeteroFL prefix: ``arange(L)`` with ``L = round(p * C)``;
* FedRolex (AIoT-MLSys-Lab/FedRolex ``split_model``): ``torch.roll(torch.arange(C), roll)[:L]``
  with ``roll = round % C`` (one channel per round) or ``round(round * step * C) % C``;
* label split: classifier rows of the labels the client holds,

and every client's dense sub-tensor is ``W[torch.meshgrid(idx_0, idx_1, ...)]`` as the
reference's ``distribute`` / ``combine`` index it.
"""
from __future__ import annotations

import torch


def small_cnn_roles(channels, num_classes=10):
    """``name -> per-dim role``: an int C (a sliced channel dim of C channels), "cls" (the
    class rows) or None (never sliced) -- SmallCNN: conv/BN stages, then the classifier."""
    roles = {}
    cin = None
    for i, c in enumerate(channels):
        roles[f"features.{2 * i}.weight"] = (c, cin, None, None)
        roles[f"features.{2 * i + 1}.weight"] = (c,)
        roles[f"features.{2 * i + 1}.bias"] = (c,)
        cin = c
    roles["classifier.weight"] = ("cls", cin)
    roles["classifier.bias"] = ("cls",)
    return roles


def keep(C, width):
    return int(round(width * C))


def index_sets(roles, shapes, width, round_index=None, step=None, labels=None):
    """``name -> [index tensor per dim]`` of the elements a client holds."""
    out = {}
    for name, role in roles.items():
        idx = []
        for d, r in enumerate(role):
            n = shapes[name][d]
            if r is None:
                idx.append(torch.arange(n))
            elif r == "cls":
                idx.append(torch.arange(n) if labels is None else torch.tensor(sorted(labels)))
            else:
                L = keep(r, width)
                if round_index is None:
                    idx.append(torch.arange(L))
                else:
                    roll = round_index % r if step is None else int(round(round_index * step * r)) % r
                    idx.append(torch.roll(torch.arange(r), roll)[:L])
        out[name] = idx
    return out


def grid(idx):
    return torch.meshgrid(*idx, indexing="ij")


def mask_of(sets, shapes):
    m = {n: torch.zeros(shapes[n], dtype=torch.bool) for n in sets}
    for n, idx in sets.items():
        m[n][grid(idx)] = True
    return m


def decode(flat, sets, shapes):
    """A flat upload (parameters in order, each dense block row-major in index-set order)
    -> ``name -> (full-size values, mask)``."""
    out, o = {}, 0
    for n, idx in sets.items():
        dense_shape = [len(i) for i in idx]
        k = 1
        for s in dense_shape:
            k *= s
        v = torch.zeros(shapes[n])
        v[grid(idx)] = flat[o:o + k].reshape(dense_shape)
        out[n] = v
        o += k
    assert o == flat.numel(), (o, flat.numel())
    return out


def element_mean(old, clients, weighting):
    """``clients``: list of (values dict, mask dict, num_samples). Each element: the mean over
    the clients holding it (weight 1, or n_k for "samples"); elements nobody holds keep
    ``old``."""
    new = {}
    for n, w0 in old.items():
        num = torch.zeros_like(w0, dtype=torch.float64)
        den = torch.zeros_like(w0, dtype=torch.float64)
        for vals, masks, ns in clients:
            wk = float(ns) if weighting == "samples" else 1.0
            m = masks[n].double()
            num += wk * m * vals[n].double()
            den += wk * m
        new[n] = torch.where(den > 0, num / den.clamp_min(1e-30), w0.double()).to(w0.dtype)
    return new
