"""scikit-learn's handwritten digits as a small real image-classification task."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset


@dataclass(frozen=True)
class DataSplit:
    """A train/test pair plus what a model needs to know about the images."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        """``(1, C, H, W)``: the shape profilers and exporters take."""
        return (1, self.in_channels, self.image_size, self.image_size)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Per class, a seeded permutation; the first round(frac * n_c) go to test. Written out
    # (rather than sklearn's splitter) so the split is fixed by this code, not a library version.
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def digits(image_size: int = 32, channels: int = 3, test_fraction: float = 0.25, seed: int = 0,
           normalize: bool = True) -> DataSplit:
    """scikit-learn's bundled digits (1,797 images, 10 classes), as float tensors.

    Each 8x8 image (values 0..16) is scaled to [0, 1], resized to ``image_size`` with
    bilinear ``F.interpolate`` (``align_corners=False``) and replicated to ``channels``.
    With ``normalize`` the pixels are standardised with the *training* split's mean and
    std (one scalar each, since the channels are copies), so no test statistics leak.

    The split is stratified by class and fixed by ``seed``: ``round(test_fraction * n_c)``
    images of every class ``c`` go to the test set.

    Returns a :class:`DataSplit` of two ``TensorDataset(images[N, C, S, S], labels[N])``.
    """
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"digits: image_size must be an int >= 4, got {image_size!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"digits: channels must be a positive int, got {channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8]
    labels = torch.from_numpy(raw.target.astype(np.int64))
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, channels, -1, -1).contiguous()
    train_idx, test_idx = _stratified_split(raw.target, test_fraction, seed)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    if normalize:
        tr = images[train_idx]
        mean, std = tr.mean(), tr.std()
        images = (images - mean) / std
    return DataSplit(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        test=TensorDataset(images[test_idx], labels[test_idx]),
        num_classes=10, in_channels=channels, image_size=image_size,
    )
