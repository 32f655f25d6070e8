"""summary.md tables: means and sample standard deviations over seeds, by hand."""
from slimkern.prune.summary import dac_summary, dwnp_summary


def _cluster(kind, acc, macs, peak, width=None):
    return {"kind": kind, "budget": {"macs_ratio": 0.5}, "final_accuracy": acc, "macs": macs, "params": 10,
            "peak_activation_bytes": peak, "width": width}


def test_dac_summary_by_hand():
    full = {"macs": 100, "params": 20, "peak_activation_bytes": 1000, "accuracy": 0.5}
    runs = [{"seed": 0, "full": dict(full, fl_accuracy=[0.1, 0.90]),
             "clusters": [_cluster("dac", 0.90, 40, 400), _cluster("width", 0.80, 44, 600, 0.6)]},
            {"seed": 1, "full": dict(full, fl_accuracy=[0.1, 0.94]),
             "clusters": [_cluster("dac", 0.94, 42, 500), _cluster("width", 0.84, 46, 600, 0.7)]}]
    text = dac_summary({"runs": runs})
    # accuracy mean 92, sample std sqrt(((90-92)^2 + (94-92)^2) / 1) = 2.83; peak ratio 0.45 +- 0.071
    assert "| DAC | 92.00 ± 2.83 | 41 ± 1 | 10 ± 0 | 450 ± 71 | 0.450 ± 0.071 |" in text
    assert "| width x0.650 ± 0.071 | 82.00 ± 2.83 | 45 ± 1 |" in text
    assert "after FedAvg over all clients 92.00 ± 2.83 %" in text


def test_dwnp_summary_by_hand():
    def part(i, acc, target, learned, ratio):
        return {"index": i, "accuracy": acc, "target": target, "learned_ratio": learned, "ratio": ratio}
    runs = [{"seed": s, "base_accuracy": b, "shared_accuracy": 0.9,
             "server": part(0, b - 0.01, 0.8, 0.9, 0.8), "devices": [part(1, b - 0.03, 0.5, 0.55, 0.5)]}
            for s, b in [(0, 0.95), (1, 0.97)]]
    text = dwnp_summary({"runs": runs})
    assert "| server | 96.00 ± 1.41 | 95.00 ± 1.41 | -1.00 ± 0.00 | 0.800 | 0.900 ± 0.000 | 0.800 ± 0.000 | 20.0 ± 0.0 |" \
        in text
    assert "| device 1 | 96.00 ± 1.41 | 93.00 ± 1.41 | -3.00 ± 0.00 | 0.500 | 0.550 ± 0.000 | 0.500 ± 0.000 | 50.0 ± 0.0 |" \
        in text
