"""The evaluation report: per switch top-1, total and per-device MACs, params, trained flag.

Written atomically as JSON / CSV; printed as a rich table; plotted as accuracy vs MFLOPs
with the ParaDiS "distributed" view (the largest per-device cost) as its own curve and the
individually trained models as separate markers, like the ParaDiS paper's figures.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

FIELDS = ("switch", "kind", "branches", "top1", "macs", "max_device_macs", "params", "max_device_params",
          "trained", "correct", "total")


@dataclass
class SwitchResult:
    """One evaluated switch. ``top1`` is a fraction in [0, 1]; ``macs`` counts multiply-adds
    of one image summed over all branches (devices); ``max_device_macs`` is the largest
    single branch's share (the latency view when each branch runs on its own device)."""

    switch: str
    top1: float
    macs: int
    max_device_macs: int
    params: int
    max_device_params: int
    trained: bool | None
    kind: str = "shared"       # "shared" (one weight set for all switches) or "individual"
    branches: int = 1
    correct: int = 0
    total: int = 0

    @property
    def mflops(self) -> float:
        """MFLOPs as the ParaDiS / slimmable papers report them: millions of multiply-adds."""
        return self.macs / 1e6


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None, **savefig_kw) -> None:
    """Saves a matplotlib figure atomically and closes it: a temporary file in the target's
    folder (created if missing), then ``os.replace``; the temporary file is removed on error.
    ``dpi`` None keeps the figure's own dpi; ``savefig_kw`` go to ``fig.savefig``."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, **({"dpi": dpi} if dpi is not None else {}), **savefig_kw)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Report:
    results: list[SwitchResult]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key) -> SwitchResult:
        """``report["[0.5, 0.5]x"]`` or ``report[Switch([0.5, 0.5])]``: the shared net's result
        (``report["[0.5, 0.5]x", "individual"]`` for the individual model)."""
        kind = "shared"
        if isinstance(key, tuple):
            key, kind = key
        for r in self.results:
            if r.switch == str(key) and r.kind == kind:
                return r
        raise KeyError(f"no {kind} result for switch {key}; have {[(r.switch, r.kind) for r in self.results]}")

    def to_dict(self) -> dict:
        return {"meta": self.meta, "switches": [asdict(r) for r in self.results]}

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def to_csv(self, path: str | os.PathLike) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
        w.writeheader()
        for r in self.results:
            w.writerow({k: getattr(r, k) for k in FIELDS})
        atomic_write_text(path, buf.getvalue())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Report":
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        return cls([SwitchResult(**r) for r in d["switches"]], d.get("meta", {}))

    def table(self, title: str | None = None):
        """A ``rich.table.Table`` (print it with ``rich.print`` or :meth:`print`)."""
        from rich.table import Table

        from rich import box

        t = Table(title=title or self.meta.get("title", "slimkern evaluation"), box=box.SIMPLE_HEAD,
                  caption="MMAC: millions of multiply-adds per image (all devices / busiest device)")
        for col, just in (("switch", "left"), ("model", "left"), ("top1 %", "right"), ("MMAC", "right"),
                          ("MMAC/dev", "right"), ("kparam", "right"), ("trained", "center")):
            t.add_column(col, justify=just, no_wrap=col in ("switch", "model"))
        for r in self.results:
            trained = {True: "yes", False: "no", None: "?"}[r.trained]
            t.add_row(r.switch, "indiv." if r.kind == "individual" else r.kind, f"{100 * r.top1:.2f}",
                      f"{r.macs / 1e6:.2f}", f"{r.max_device_macs / 1e6:.2f}", f"{r.params / 1e3:.1f}", trained)
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console()).print(self.table())

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Accuracy vs MFLOPs (log x): the shared net's switches at their total cost, the
        distributable (multi-branch) switches again at their per-device cost, and the
        individual models as separate markers. Saved atomically (matplotlib Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shared = sorted([r for r in self.results if r.kind == "shared"], key=lambda r: r.macs)
        indiv = [r for r in self.results if r.kind == "individual"]
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        if shared:
            ax.plot([r.macs / 1e6 for r in shared], [100 * r.top1 for r in shared], "o-", color="C0",
                    label="shared net, total MFLOPs")
            dist = sorted([r for r in shared if r.branches > 1], key=lambda r: r.max_device_macs)
            if dist:
                ax.plot([r.max_device_macs / 1e6 for r in dist], [100 * r.top1 for r in dist], "s--", color="C1",
                        label="distributed: max MFLOPs per device")
            for r in shared:
                ax.annotate(r.switch + ("" if r.trained in (True, None) else " (untrained)"),
                            (r.macs / 1e6, 100 * r.top1), fontsize=7, xytext=(4, -10), textcoords="offset points")
        if indiv:
            ax.plot([r.macs / 1e6 for r in indiv], [100 * r.top1 for r in indiv], "*", color="C3", markersize=12,
                    linestyle="none", label="individual models")
            for r in indiv:
                ax.annotate(r.switch, (r.macs / 1e6, 100 * r.top1), fontsize=7, xytext=(4, 4),
                            textcoords="offset points", color="C3")
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("MFLOPs (millions of multiply-adds per image)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title or self.meta.get("title", "accuracy vs cost"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        save_figure(fig, path)
