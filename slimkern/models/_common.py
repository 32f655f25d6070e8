from __future__ import annotations

from slimkern.nn import SlimConv2d, SlimLinear, SwitchableBatchNorm2d


def scaled(channels: int, width_mult: float, divisor: int = 1) -> int:
    """``channels * width_mult`` rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    if not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    return max(divisor, int(round(channels * width_mult / divisor)) * divisor)


class Layers:
    """Makes the slim layers of one net with a shared ``max_width``/``divisor``.

    Every sliced channel dimension carries a *group* name, so per-layer switches
    (``Switch.from_channels``) can address it; layers tied by a residual add share a group.
    The image input (``slice_in=False`` on the stem) and the class output (the fused
    classifier) are never sliced.
    """

    def __init__(self, max_width: float, divisor: int = 1):
        if not isinstance(max_width, (int, float)) or max_width < 1.0:
            raise ValueError(f"max_width must be a number >= 1.0 (the 1.0x net must fit), got {max_width!r}")
        self.max_width, self.divisor = float(max_width), divisor

    def conv(self, cin, cout, k, stride=1, padding=0, groups=1, *, in_group=None, out_group=None, slice_in=True):
        return SlimConv2d(cin, cout, k, stride, padding, groups=groups, bias=False, max_width=self.max_width,
                          divisor=self.divisor, slice_in=slice_in, in_group=in_group, out_group=out_group)

    def bn(self, c, group, activation="none"):
        return SwitchableBatchNorm2d(c, max_width=self.max_width, divisor=self.divisor, group=group,
                                     activation=activation)

    def classifier(self, cin, num_classes, in_group):
        return SlimLinear(cin, num_classes, max_width=self.max_width, divisor=self.divisor, slice_out=False,
                          in_group=in_group)
