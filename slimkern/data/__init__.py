"""Data for slimkern: real data with no download.

- :func:`digits`: scikit-learn's bundled handwritten digits (1,797 8x8 grey images),
  resized and replicated to the image size and channel count a model expects, with a
  fixed seeded stratified train/test split.
- :func:`cifar10`, :func:`cifar100`: the python-pickle batches from a local root.
- :func:`image_folder`: torchvision's ``ImageFolder`` from a local root.
- :class:`CifarAugment`: random crop with 4-pixel zero padding + horizontal flip, on tensors.

Nothing here downloads: a missing root raises ``FileNotFoundError`` naming the path.
"""
from slimkern.data.augment import CifarAugment, random_crop_flip
from slimkern.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CifarDataset, cifar10, cifar100
from slimkern.data.digits import DataSplit, digits
from slimkern.data.folder import image_folder

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CifarAugment", "CifarDataset",
    "DataSplit", "cifar10", "cifar100", "digits", "image_folder", "random_crop_flip",
]
