"""Bicubic x``r`` super-resolution on the photographs scikit-image's wheel ships (nothing downloaded).

scikit-image carries a few real photographs in ``skimage/data`` (astronaut, chelsea the cat,
coffee, rocket, the Hubble deep field, a retina, ...). The task is the usual single-image SR
benchmark: a low-resolution input is the high-resolution image downscaled by bicubic
interpolation with antialiasing (``F.interpolate(..., mode="bicubic", antialias=True)``, the
PIL/MATLAB ``imresize`` convention); the net predicts the high-resolution image.

Training: random ``patch x patch`` HR crops (with their LR counterparts) of the *train*
photographs, flipped / rotated by multiples of 90 degrees, drawn once from a seeded generator.
Testing: whole (or centre-cropped) *test* photographs, which no training patch comes from.
Grey photographs are replicated to three channels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

# Photographs (not charts, drawings or synthetic images) in scikit-image's bundled data.
TRAIN_PHOTOS = ("rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "motorcycle_left.png",
                "camera.png", "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png")
TEST_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png")


def _data_dir() -> str:
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the super-resolution task reads scikit-image's bundled photographs: "
                          "pip install scikit-image (or slimkern[sr])") from e
    return os.path.dirname(skimage.data.__file__)


def load_photo(name: str) -> torch.Tensor:
    """One bundled photograph as a float tensor ``[3, H, W]`` in [0, 1] (grey -> 3 channels,
    alpha dropped). Raises FileNotFoundError naming the file when it is not in the wheel."""
    import skimage.io

    if not isinstance(name, str) or not name:
        raise ValueError(f"load_photo: name must be a file name like 'astronaut.png', got {name!r}")
    path = os.path.join(_data_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name!r} is not among scikit-image's bundled images ({_data_dir()}); "
                                "nothing is downloaded")
    a = torch.from_numpy(skimage.io.imread(path)).float().div_(255.0)
    if a.dim() == 2:
        a = a.unsqueeze(-1).expand(-1, -1, 3)
    return a[..., :3].permute(2, 0, 1).contiguous()


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, C, H, W]`` (H, W multiples of ``scale``) -> bicubic antialiased ``[N, C, H/r, W/r]``, clamped."""
    if hr.dim() != 4 or hr.shape[-1] % scale or hr.shape[-2] % scale:
        raise ValueError(f"bicubic_down: need [N, C, H, W] with H, W multiples of {scale}, got {tuple(hr.shape)}")
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    return F.interpolate(hr, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)


def bicubic_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: ``[N, C, h, w]`` -> ``[N, C, r h, r w]``, clamped to [0, 1]."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(0, 1)


@dataclass(frozen=True)
class SRSplit:
    """``train``: ``TensorDataset(lr [N, 3, p/r, p/r], hr [N, 3, p, p])``; ``test``: list of
    ``(name, lr [1, 3, h, w], hr [1, 3, r h, r w])``."""

    train: TensorDataset
    test: list
    scale: int
    patch: int


def _check(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"super_resolution: {name} must be an int >= {lo}, got {v!r}")


def super_resolution(scale: int = 2, patch: int = 48, num_patches: int = 2000, test_crop: int | None = 256,
                     seed: int = 0, train_photos=TRAIN_PHOTOS, test_photos=TEST_PHOTOS) -> SRSplit:
    """The bicubic x``scale`` task (see the module docstring).

    Args:
        scale: upsampling factor ``r``. patch: HR training patch side (a multiple of ``r``).
        num_patches: training patches, drawn uniformly over the train photographs (each photo
            chosen with probability proportional to its area), random flip / 90-degree rotation.
        test_crop: centre crop side of each test photograph (a multiple of ``r``; None: the
            whole photograph cropped to multiples of ``r``).
        seed: fixes the patches.
    """
    _check("scale", scale, 2)
    _check("patch", patch, scale)
    _check("num_patches", num_patches, 1)
    if patch % scale:
        raise ValueError(f"super_resolution: patch {patch} must be a multiple of scale {scale}")
    if test_crop is not None:
        _check("test_crop", test_crop, scale)
        if test_crop % scale:
            raise ValueError(f"super_resolution: test_crop {test_crop} must be a multiple of scale {scale}")
    overlap = set(train_photos) & set(test_photos)
    if overlap:
        raise ValueError(f"super_resolution: photographs in both train and test: {sorted(overlap)}")
    g = torch.Generator().manual_seed(seed)
    photos = [load_photo(n) for n in train_photos]
    small = [n for n, p in zip(train_photos, photos) if min(p.shape[1:]) < patch]
    if small:
        raise ValueError(f"super_resolution: photographs smaller than the patch {patch}: {small}")
    areas = torch.tensor([float(p.shape[1] * p.shape[2]) for p in photos])
    which = torch.multinomial(areas, num_patches, replacement=True, generator=g)
    hr = torch.empty(num_patches, 3, patch, patch)
    for k, i in enumerate(which.tolist()):
        p = photos[i]
        y = int(torch.randint(0, p.shape[1] - patch + 1, (), generator=g))
        x = int(torch.randint(0, p.shape[2] - patch + 1, (), generator=g))
        c = p[:, y:y + patch, x:x + patch]
        rot, flip = int(torch.randint(0, 4, (), generator=g)), bool(torch.randint(0, 2, (), generator=g))
        c = torch.rot90(c, rot, (1, 2))
        hr[k] = c.flip(2) if flip else c
    train = TensorDataset(bicubic_down(hr, scale), hr)
    test = []
    for n in test_photos:
        p = load_photo(n)
        if test_crop is not None:
            if min(p.shape[1:]) < test_crop:
                raise ValueError(f"super_resolution: test photograph {n} is smaller than test_crop {test_crop}")
            y0, x0 = (p.shape[1] - test_crop) // 2, (p.shape[2] - test_crop) // 2
            p = p[:, y0:y0 + test_crop, x0:x0 + test_crop]
        else:
            p = p[:, :p.shape[1] // scale * scale, :p.shape[2] // scale * scale]
        p = p.unsqueeze(0).contiguous()
        test.append((n, bicubic_down(p, scale), p))
    return SRSplit(train, test, scale, patch)
