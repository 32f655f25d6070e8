"""Slimmable / ParaDiS models for 32x32 inputs, built from ``slimkern.nn`` layers.

Every builder takes ``num_classes``, ``in_channels``, ``max_width`` (the widest switch, e.g.
1.2 for the ParaDiS wide teacher) and ``width_mult`` (scales the 1.0x channel counts, for
small CPU-sized nets). All switches (``Switch([0.5, 0.5])``, ``[4x0.25]``, per-layer
``Switch.from_channels``) run on them; the classifier fuses branches (ParaDiS).
"""
from slimkern.models.mobilenet_v1 import MobileNetV1
from slimkern.models.mobilenet_v2 import MobileNetV2
from slimkern.models.resnet import CifarResNet, resnet18, resnet20
from slimkern.models.wdsr import WDSR, wdsr


def mobilenet_v1(num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0, width_mult: float = 1.0,
                 **kw) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels, max_width, width_mult, **kw)


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0, width_mult: float = 1.0,
                 **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, max_width, width_mult, **kw)


MODELS = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2, "resnet20": resnet20, "resnet18": resnet18,
          "wdsr": wdsr}


def build(name: str, num_classes: int = 10, in_channels: int = 3, max_width: float = 1.0, width_mult: float = 1.0,
          **kw):
    """``build("mobilenet_v1", num_classes=10, max_width=1.2, width_mult=0.25)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, max_width=max_width,
                        width_mult=width_mult, **kw)


__all__ = ["CifarResNet", "MODELS", "MobileNetV1", "MobileNetV2", "build", "mobilenet_v1", "mobilenet_v2",
           "resnet18", "resnet20", "WDSR", "wdsr"]
