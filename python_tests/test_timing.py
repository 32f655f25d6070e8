"""slimkern.timing against hand counts and hand-computed percentiles."""
import time

import numpy as np
import pytest

from slimkern.timing import time_calls, timing_stats


def test_time_calls_counts_warmup_and_times_each_call():
    calls = []

    def f(d):
        calls.append(d)
        time.sleep(d)

    ts = time_calls(f, 0.01, warmup=2, repeats=3)
    assert len(calls) == 5 and len(ts) == 3
    assert all(0.01 <= t < 5.0 for t in ts)


def test_timing_stats_by_hand():
    ts = [float(v) for v in range(10, 0, -1)]  # 1..10, unsorted
    s = timing_stats(ts)
    # exclusive percentiles: rank p (n + 1) = 1.1 and 9.9 of the sorted values 1..10
    assert s == pytest.approx({"median": 5.5, "p10": 1.1, "p90": 9.9, "min": 1.0})
    assert s["p10"] == pytest.approx(np.percentile(ts, 10, method="weibull"))
    assert timing_stats([0.3]) == {"median": 0.3, "p10": 0.3, "p90": 0.3, "min": 0.3}


def test_arguments_are_validated():
    with pytest.raises(TypeError, match="callable"):
        time_calls(3)
    with pytest.raises(ValueError, match="repeats"):
        time_calls(print, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_calls(print, warmup=True)
    with pytest.raises(ValueError, match="no times"):
        timing_stats([])
