"""Shapes and block tables shared by the Triton and CUDA block-op tests.

Each case exercises something the kernels must get right: overlapping blocks (1.0x and
0.5x reading the same corner of the weight), ParaDiS disjoint blocks, blocks sharing one
input (all-zero x_offsets), stride, padding, dilation, rectangular kernels, depthwise.
"""
import torch

from reference import ref_block_conv2d, ref_block_linear  # noqa: F401  (re-exported for the tests)


# (id, N, x_channels, H, W, weight shape, blocks, x_offsets, stride, padding, dilation, depthwise)
CONV_CASES = [
    ("overlap_3x3", 2, 9, 6, 5, (8, 6, 3, 3), [(0, 6, 0, 8), (0, 3, 0, 4)], [0, 6], 1, 1, 1, False),
    ("paradis_1x1_s2", 2, 8, 7, 6, (8, 8, 1, 1), [(0, 4, 0, 4), (4, 8, 4, 8)], [0, 4], 2, 0, 1, False),
    ("shared_input", 2, 3, 7, 7, (6, 3, 3, 3), [(0, 3, 0, 6), (0, 3, 0, 3)], [0, 0], 2, 1, 1, False),
    ("dilated_rect", 1, 5, 7, 8, (5, 4, 3, 2), [(1, 4, 0, 5), (0, 2, 3, 5)], [0, 3], (1, 2), (2, 0), (2, 1),
     False),
    ("three_blocks_wide", 2, 40, 4, 4, (36, 24, 3, 3), [(0, 24, 0, 36), (0, 12, 0, 18), (12, 16, 18, 22)],
     [0, 24, 36], 1, 1, 1, False),
    ("dw_overlap_s2", 2, 12, 7, 7, (8, 1, 3, 3), [(0, 8, 0, 8), (0, 4, 0, 4)], [0, 8], 2, 1, 1, True),
    ("dw_dilated", 2, 6, 8, 7, (6, 1, 3, 3), [(0, 3, 0, 3), (3, 6, 3, 6)], [0, 3], 1, 2, 2, True),
    ("dw_5x5_shared", 1, 4, 9, 9, (8, 1, 5, 5), [(0, 4, 0, 4), (4, 8, 4, 8)], [0, 0], 2, 2, 1, True),
]

# (id, N, x_channels, weight shape, blocks, x_offsets)
LINEAR_CASES = [
    ("overlap", 5, 30, (24, 20), [(0, 20, 0, 24), (0, 10, 0, 12)], [0, 20]),
    ("paradis", 3, 16, (20, 16), [(0, 8, 0, 10), (8, 12, 10, 15), (12, 16, 15, 20)], [0, 8, 12]),
    ("shared_input", 4, 7, (9, 7), [(0, 7, 0, 9), (0, 7, 0, 5), (2, 5, 3, 4)], [0, 0, 2]),
    ("classifier_partial", 6, 40, (10, 40), [(0, 20, 0, 10), (20, 40, 0, 10)], [0, 20]),
]


def flat(blocks):
    """A block table as the schema's flat int[] (G*4 ints)."""
    return [v for b in blocks for v in b]


def _rand(shape, device, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def make_conv_inputs(case, device, dtype=torch.float32, bias=True, noncontig=False, seed=0):
    """(x, weight, bias, blocks, x_offsets, stride, padding, dilation, depthwise) for a case.

    noncontig: x is a channels-last view with a gap along W and the weight a slice of a
    larger tensor, so kernels that assume contiguity (or copy the weight) are caught.
    """
    _, N, cx, H, W, wshape, blocks, offs, stride, padding, dilation, depthwise = case
    gen = torch.Generator().manual_seed(seed)
    if noncontig:
        x = _rand((N, H, 2 * W, cx), device, dtype, gen).permute(0, 3, 1, 2)[:, :, :, ::2]
        big = _rand((wshape[0] + 2, wshape[1] + 3, *wshape[2:]), device, dtype, gen)
        w = big[1:1 + wshape[0], 2:2 + wshape[1]]
        assert not x.is_contiguous() and not w.is_contiguous()
    else:
        x = _rand((N, cx, H, W), device, dtype, gen)
        w = _rand(wshape, device, dtype, gen)
    b = _rand((wshape[0],), device, dtype, gen) if bias else None
    return x, w, b, blocks, offs, stride, padding, dilation, depthwise
