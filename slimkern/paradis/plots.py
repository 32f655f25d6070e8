"""Plots of the ParaDiS experiments (matplotlib Agg, saved atomically): Figure 4 (right) and
grouped bars with the seeds' standard deviation as error bars."""
from __future__ import annotations

from slimkern.report import save_figure


def _macs_label(v: float, _=None) -> str:
    """0.25M, 1M, 3.1M: millions of multiply-adds, short enough for a tick."""
    return f"{v / 1e6:.2g}M" if v >= 1e5 else f"{v / 1e3:.3g}k"


def figure4(points: dict, path, title: str) -> None:
    """Accuracy vs MACs per image (log x, ticks at the plotted MACs): the ParaDiS switches at
    their total MACs (filled: trained, empty circles: never trained), the distributed curve
    ([4x0.25], [0.5,0.5], [1.0] at the MACs of their busiest device), the individual models as
    diamonds and the universally slimmable curve. Error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    us = points["us"]
    if us:
        ax.errorbar([s["macs"] for s in us], [s["mean"] for s in us], yerr=[s["std"] for s in us], fmt="^-",
                    color="C2", ms=5, capsize=2, label="US-Nets (sandwich + IPKD), total MACs")
    trained = sorted([s for s in points["shared"] if s["trained"]], key=lambda s: s["macs"])
    ax.errorbar([s["macs"] for s in trained], [s["mean"] for s in trained], yerr=[s["std"] for s in trained],
                fmt="o-", color="C0", capsize=2, label="ParaDiS shared net, total MACs")
    for s in points["shared"]:
        if not s["trained"]:
            ax.errorbar([s["macs"]], [s["mean"]], yerr=[s["std"]], fmt="o", mfc="none", mec="C0", color="C0",
                        ms=8, capsize=2, label="ParaDiS, never-trained switch")
    dist = sorted(points["distributed"], key=lambda s: s["max_device_macs"])
    ax.errorbar([s["max_device_macs"] for s in dist], [s["mean"] for s in dist], yerr=[s["std"] for s in dist],
                fmt="s--", color="C1", capsize=2, label="ParaDiS distributed: MACs per device")
    ind = points["individual"]
    if ind:
        ax.errorbar([s["macs"] for s in ind], [s["mean"] for s in ind], yerr=[s["std"] for s in ind], fmt="D",
                    color="C3", ms=7, capsize=2, label="individual models")
    for s in points["shared"]:
        ax.annotate(s["switch"].replace("0.25, 0.25, 0.25, 0.25", "4x0.25"), (s["macs"], s["mean"]), fontsize=7,
                    xytext=(4, -11), textcoords="offset points", color="C0")
    for s in dist:
        if s["branches"] > 1:
            ax.annotate(s["switch"].replace("0.25, 0.25, 0.25, 0.25", "4x0.25") + "/dev", (s["max_device_macs"], s["mean"]),
                        fontsize=7, xytext=(4, 5), textcoords="offset points", color="C1")
    for s in ind:
        ax.annotate(s["switch"].replace("0.25, 0.25, 0.25, 0.25", "4x0.25"), (s["macs"], s["mean"]), fontsize=7,
                    xytext=(5, 4), textcoords="offset points", color="C3")
    for s in us[::2]:
        ax.annotate(s["switch"], (s["macs"], s["mean"]), fontsize=6, xytext=(-4, -12), textcoords="offset points",
                    color="C2")
    ax.set_xscale("log")
    xs = sorted({s["macs"] for s in trained} | {s["max_device_macs"] for s in dist}
                | ({us[0]["macs"], us[-1]["macs"]} if us else set()))
    keep = [xs[0]]
    for v in xs[1:]:
        if v / keep[-1] > 1.25:  # ticks closer than 25 % would overprint
            keep.append(v)
    ax.xaxis.set_major_locator(FixedLocator(keep))
    ax.xaxis.set_major_formatter(FuncFormatter(_macs_label))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("MACs (multiply-adds per image; M = millions)")
    ax.set_ylabel("top-1 accuracy on digits (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def grouped_bars(groups: list[str], series: list[tuple[str, list]], path, title: str, ylabel: str) -> None:
    """One group of bars per entry of ``groups``; ``series`` = [(name, [stat or None per group])],
    the height a stat's ``mean`` and its error bar the ``std``; y axis zoomed to the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.4), dpi=120)
    n = len(series)
    width = 0.8 / max(1, n)
    lo = []
    for i, (name, stats) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        hs = [s["mean"] if s else 0.0 for s in stats]
        es = [s["std"] if s else 0.0 for s in stats]
        ax.bar(xs, hs, width, yerr=es, capsize=2, label=name)
        lo += [s["mean"] - s["std"] for s in stats if s]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    if lo:
        ax.set_ylim(max(0.0, min(lo) - 3.0), 100.0)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
