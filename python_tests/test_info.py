import subprocess
import sys

import pytest
import torch

from slimkern import _library, info


def test_extension_loads_and_reports_build():
    assert _library.LOAD_ERROR is None, _library.LOAD_ERROR
    build = _library.build_info()
    assert build["torch"] == torch.__version__
    assert _library.torch_mismatch() is None


def test_info_command_prints_ops_table():
    out = subprocess.run([sys.executable, "-m", "slimkern.info"], capture_output=True, text=True, check=True).stdout
    assert "torch (built against)" in out
    for op in info.PUBLIC_OPS:
        assert op in out


def test_missing_op_error_names_the_op():
    with pytest.raises(RuntimeError, match="no_such_op"):
        _library.require_op("no_such_op")
