"""slimkern.report.save_figure: the one atomic figure writer of every run folder."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from slimkern.report import save_figure  # noqa: E402


def test_writes_a_png_and_leaves_no_temporary_file(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "sub" / "plot.png"  # the folder is created
    save_figure(fig, path, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "sub") == ["plot.png"]
    assert not plt.fignum_exists(fig.number)  # closed


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    fig, _ = plt.subplots()
    with pytest.raises(TypeError):
        save_figure(fig, path, no_such_option=1)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["plot.png"]
