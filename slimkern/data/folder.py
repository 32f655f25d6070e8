"""ImageFolder (``root/<split>/<class>/<image>``) via torchvision, from a local root."""
from __future__ import annotations

import os

from slimkern.data.digits import DataSplit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_folder(root: str | os.PathLike, image_size: int = 224, train_dir: str = "train",
                 test_dir: str = "val", augment: bool = True) -> DataSplit:
    """``root/train`` and ``root/val`` read with ``torchvision.datasets.ImageFolder``.

    Training: ``RandomResizedCrop(image_size)`` + flip when ``augment``; test: resize to
    ``image_size / 0.875`` and center-crop (the usual ImageNet protocol). Normalised with
    the ImageNet mean/std. Raises ``FileNotFoundError`` naming the missing folder.
    """
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    root = os.fspath(root)
    for sub in ("", train_dir, test_dir):
        p = os.path.join(root, sub) if sub else root
        if not os.path.isdir(p):
            raise FileNotFoundError(f"ImageFolder root not found: {p!r} (expected {root!r}/{train_dir}/<class>/*.jpg "
                                    f"and {root!r}/{test_dir}/<class>/*.jpg; slimkern never downloads)")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment:
        train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        train_tf = T.Compose([T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size), T.ToTensor(), norm])
    train = ImageFolder(os.path.join(root, train_dir), transform=train_tf)
    test = ImageFolder(os.path.join(root, test_dir), transform=test_tf)
    if train.classes != test.classes:
        raise ValueError(f"image_folder: class folders differ between {train_dir!r} and {test_dir!r}")
    return DataSplit(train=train, test=test, num_classes=len(train.classes), in_channels=3, image_size=image_size)
