"""Switch: notation round trip, value semantics, channel ranges, errors."""
import pickle

import pytest

from slimkern import Switch


@pytest.mark.parametrize("text,branches", [
    ("[0.5, 0.25, 0.25]x", ((0.0, 0.5), (0.5, 0.75), (0.75, 1.0))),
    ("[4x0.25]x", ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))),
    ("0.5x", ((0.0, 0.5),)),
    ("[1.2]x", ((0.0, 1.2),)),
    ("[0.25:0.75]x", ((0.25, 0.75),)),
    ("[0.5, 2x0.25]x", ((0.0, 0.5), (0.5, 0.75), (0.75, 1.0))),
])
def test_parse(text, branches):
    sw = Switch.parse(text)
    assert sw.branches == branches
    assert Switch.parse(str(sw)) == sw


def test_str_and_constructors():
    assert str(Switch.parse("[4x0.25]x")) == "[0.25, 0.25, 0.25, 0.25]x"
    assert str(Switch([0.5, 0.25, 0.25])) == "[0.5, 0.25, 0.25]x"
    assert Switch.width(0.25) == Switch([0.25]) == Switch(0.25)
    assert Switch.ranges([(0.0, 0.5), (0.5, 1.0)]) == Switch([0.5, 0.5])
    assert str(Switch.ranges([(0.25, 0.75)])) == "[0.25:0.75]x"
    # float noise does not break equality or the round trip
    assert Switch([0.1, 0.2]) == Switch.ranges([(0.0, 0.1), (0.1, 0.3)])
    sw = Switch([0.1, 0.2, 0.3])
    assert Switch.parse(str(sw)) == sw
    mixed = Switch.ranges([(0.5, 0.75), (0.0, 0.25)])
    assert Switch.parse(str(mixed)) == mixed and mixed.num_branches == 2


def test_value_semantics():
    a, b = Switch([0.5, 0.5]), Switch.parse("[2x0.5]x")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Switch([1.0])
    with pytest.raises(AttributeError, match="immutable"):
        a._branches = ()
    assert pickle.loads(pickle.dumps(a)) == a
    assert len(a) == 2


def test_channel_ranges_tile_exactly():
    assert Switch([0.5, 0.25, 0.25]).channel_ranges(10) == [(0, 5), (5, 8), (8, 10)]
    assert Switch([1 / 3] * 3).channel_ranges(10) == [(0, 3), (3, 7), (7, 10)]
    assert Switch([1.2]).channel_ranges(10, max_width=1.2) == [(0, 12)]
    assert Switch.ranges([(0.25, 0.75)]).channel_ranges(16) == [(4, 12)]
    assert Switch([0.5, 0.5]).channel_ranges(24, divisor=8) == [(0, 16), (16, 24)]
    for c in range(3, 40):
        rs = Switch([0.25] * 4).channel_ranges(c * 4)
        assert rs[0][0] == 0 and rs[-1][1] == 4 * c
        assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))


def test_from_channels():
    sw = Switch.from_channels({"stem": (4, 4), "b1": [6, 2]})
    assert sw.is_per_layer and sw.num_branches == 2 and sw.groups == ("b1", "stem")
    assert sw.channel_ranges(8, group="b1") == [(0, 6), (6, 8)]
    assert Switch.parse(str(sw)) == sw
    assert str(sw) == "{b1: [6, 2], stem: [4, 4]}ch"
    assert Switch.from_channels({"a": 3}).channel_ranges(8, group="a") == [(0, 3)]
    with pytest.raises(ValueError, match="no entry for channel group 'c'"):
        sw.channel_ranges(8, group="c")
    with pytest.raises(ValueError, match="needs 8 channels but the layer has only 6"):
        sw.channel_ranges(6, group="b1")
    with pytest.raises(ValueError, match="same number of branches"):
        Switch.from_channels({"a": (2, 2), "b": 3})
    with pytest.raises(ValueError, match="at least one channel"):
        Switch.from_channels({"a": (2, 0)})


@pytest.mark.parametrize("bad,msg", [
    ("[0.5, 0.5]", "missing the trailing 'x'"),
    ("[0.5, abc]x", "bad branch 'abc'"),
    ("[]x", "no branches"),
    ("0.5, 0.5x", "needs brackets"),
    ("[0x0.5]x", "bad branch"),
])
def test_parse_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Switch.parse(bad)


def test_invalid_switches():
    with pytest.raises(ValueError, match="branch 1 is empty"):
        Switch([0.5, 0.0])
    with pytest.raises(ValueError, match="overlap"):
        Switch.ranges([(0.0, 0.5), (0.25, 0.75)])
    with pytest.raises(ValueError, match="below 0"):
        Switch.ranges([(-0.25, 0.5)])
    with pytest.raises(ValueError, match="at least one branch"):
        Switch([])
    with pytest.raises(TypeError, match="use Switch.parse"):
        Switch("[0.5]x")
    with pytest.raises(ValueError, match="above the net's max_width 1.0"):
        Switch([1.2]).channel_ranges(10)
    with pytest.raises(ValueError, match="has no channels"):
        Switch([0.9, 0.05, 0.05]).channel_ranges(8)
