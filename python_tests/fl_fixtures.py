"""Helpers shared by the federated tests: torch's thread count for a block, the digits split."""
from __future__ import annotations

import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to ``n`` inside the block (tiny ops: a second OpenMP thread
    only adds barrier stalls; and float sums depend on the thread count), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digits_split(n_train: int, test: slice):
    """scikit-learn's digits (8x8, standardised like the federated tests do), shuffled with
    seed 0: ``((X[:n_train], Y[:n_train]), (X[test], Y[test]))`` of the permutation."""
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    Y = torch.tensor(d.target)
    g = np.random.default_rng(0).permutation(len(Y))
    tr, te = g[:n_train], g[test]
    return (X[tr], Y[tr]), (X[te], Y[te])
