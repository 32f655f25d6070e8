"""A plain WDSR of torch layers (nn.Conv2d under parametrizations.weight_norm) holding a slim
WDSR's weights: the hand-built reference of test_wdsr.py and test_wdsr_export.py."""
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

import slimkern
from slimkern.models.wdsr import WDSR


def _wn(m, out_rng, in_rng, norm_over=None):
    """torch weight-normed conv holding the slim conv's g[out], v[out, in] (bias once if given).
    ``norm_over``: the (contiguous) input range the norm should cover, when wider than ``in_rng``."""
    (o0, o1), (i0, i1) = out_rng, in_rng
    c = weight_norm(nn.Conv2d(i1 - i0, o1 - o0, m.kernel_size, padding=m.padding, bias=True), dim=0)
    with torch.no_grad():
        c.parametrizations.weight.original1.copy_(m.weight_v[o0:o1, i0:i1])
        c.parametrizations.weight.original0.copy_(m.weight_g[o0:o1].view(-1, 1, 1, 1))
        c.bias.copy_(m.bias[o0:o1])
    return c


class PlainWDSRTrunk(nn.Module):
    """head + wide-activation blocks of one branch, from plain torch layers."""

    def __init__(self, net: WDSR, feat, mids):
        super().__init__()
        self.head = _wn(net.head, feat, (0, 3))
        self.c1 = nn.ModuleList(_wn(b.conv1, mid, feat) for b, mid in zip(net.body, mids))
        self.c2 = nn.ModuleList(_wn(b.conv2, feat, mid) for b, mid in zip(net.body, mids))

    def forward(self, x):
        h = self.head(x)
        for c1, c2 in zip(self.c1, self.c2):
            h = h + c2(torch.relu(c1(h)))
        return h


def plain_forward(net: WDSR, sw, x):
    """The hand-built fused WDSR of switch ``sw``: one plain trunk per branch on its channels,
    features concatenated into one weight-normed tail conv (= the sum of partial outputs),
    plus the image skip, pixel shuffle."""
    sw = slimkern.Switch(sw) if isinstance(sw, list) else sw
    feats = net.head.out_ranges(sw)
    mids = [b.conv1.out_ranges(sw) for b in net.body]
    mean = net.rgb_mean
    xm = x - mean
    hs = [PlainWDSRTrunk(net, f, [m[i] for m in mids])(xm) for i, f in enumerate(feats)]
    h = torch.cat(hs, 1)
    lo, hi = feats[0][0], feats[-1][1]
    tail = _wn(net.tail, (0, net.out_feats), (lo, hi))
    skip = _wn(net.skip, (0, net.out_feats), (0, 3))
    return nn.functional.pixel_shuffle(tail(h) + skip(xm), net.scale) + mean
