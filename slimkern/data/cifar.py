"""CIFAR-10/100 from the python-pickle batches in a local folder (never downloaded).

Layout (what https://www.cs.toronto.edu/~kriz/cifar.html ships, unpacked):
``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` and
``<root>/cifar-100-python/{train, test}``; ``root`` may also be that inner folder itself.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from slimkern.data.digits import DataSplit

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class CifarDataset(Dataset):
    """Images kept as uint8 ``[N, 3, 32, 32]`` (150 MB for CIFAR train, not 600 MB float);
    ``__getitem__`` returns the normalised float image (then ``transform``) and the label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"CifarDataset: expected uint8 [N,C,H,W] images, got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"CifarDataset: {images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = (self.images[i].float() / 255.0 - self.mean) / self.std
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


def _find(root: str | os.PathLike, inner: str, files: list[str]) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR root not found: {root!r} (slimkern never downloads; "
                                f"unpack the python version of the dataset there)")
    for cand in (os.path.join(root, inner), root):
        if all(os.path.isfile(os.path.join(cand, f)) for f in files):
            return cand
    missing = [os.path.join(root, inner, f) for f in files if not os.path.isfile(os.path.join(root, inner, f))]
    raise FileNotFoundError(f"CIFAR files missing under {root!r}: {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                            + " (slimkern never downloads; unpack the python version of the dataset there)")


def _load_batches(folder: str, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        with open(os.path.join(folder, f), "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar(root, inner, train_files, test_files, label_key, num_classes, mean, std, augment) -> DataSplit:
    folder = _find(root, inner, train_files + test_files)
    xtr, ytr = _load_batches(folder, train_files, label_key)
    xte, yte = _load_batches(folder, test_files, label_key)
    if augment is True:
        from slimkern.data.augment import CifarAugment
        augment = CifarAugment()
    return DataSplit(train=CifarDataset(xtr, ytr, mean, std, augment or None),
                     test=CifarDataset(xte, yte, mean, std), num_classes=num_classes,
                     in_channels=3, image_size=32)


def cifar10(root: str | os.PathLike, augment: bool | Callable = True) -> DataSplit:
    """CIFAR-10 from ``root`` (see module docstring); ``augment=True`` adds
    :class:`~slimkern.data.CifarAugment` to the training split."""
    return _cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                  b"labels", 10, CIFAR10_MEAN, CIFAR10_STD, augment)


def cifar100(root: str | os.PathLike, augment: bool | Callable = True) -> DataSplit:
    """CIFAR-100 (fine labels) from ``root``; see :func:`cifar10`."""
    return _cifar(root, "cifar-100-python", ["train"], ["test"], b"fine_labels", 100,
                  CIFAR100_MEAN, CIFAR100_STD, augment)
