import json
import os
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
    assert "FMA peak, 1 thread" in out
    for op in info.PUBLIC_OPS:
        assert op in out


def test_fma_peak_is_lanes_times_fma_rate():
    # A register-resident FMA loop: MAC/s = lanes x FMAs per cycle x clock. Bounds by hand for
    # any x86 core we run on (1-2 FMA units, 1-6 GHz): AVX-512 16 lanes, AVX2 8 lanes per FMA.
    cap = _library.cpu_capability()["in_use"]
    peak = _library.fma_peak(0.05)
    if cap == "default":
        assert peak is None
        return
    lanes = 16 if cap == "avx512" else 8
    assert lanes * 0.5e9 <= peak <= lanes * 2 * 6e9, peak
    with pytest.raises(ValueError, match="seconds"):
        _library.fma_peak(0)
    with pytest.raises(RuntimeError, match="seconds"):
        torch.ops.slimkern._fma_peak(20.0)


def test_missing_op_error_names_the_op():
    with pytest.raises(RuntimeError, match="no_such_op"):
        _library.require_op("no_such_op")


# ---------------------------------------------------------------------------------------
# SLIMKERN_CPU_CAPABILITY: which instruction set the C++ CPU kernels run with
# ---------------------------------------------------------------------------------------

_ORDER = _library.CPU_CAPABILITIES


def _capability_in(env_value):
    env = dict(os.environ)
    env.pop("SLIMKERN_CPU_CAPABILITY", None)
    if env_value is not None:
        env["SLIMKERN_CPU_CAPABILITY"] = env_value
    code = ("import json, warnings; warnings.simplefilter('always'); import slimkern._library as L; "
            "print(json.dumps(L.cpu_capability()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_cpu_capability_in_use_matches_request_capped_at_hardware():
    default, _ = _capability_in(None)
    hw = default["hardware"]
    assert default == {"in_use": hw, "hardware": hw, "requested": ""}
    for want in _ORDER:
        got, _ = _capability_in(want.upper())  # case-insensitive, like ATEN_CPU_CAPABILITY
        expected = want if _ORDER.index(want) <= _ORDER.index(hw) else hw
        assert got == {"in_use": expected, "hardware": hw, "requested": want}


def test_cpu_capability_unknown_value_warns_and_uses_hardware():
    got, err = _capability_in("sse9")
    assert got["in_use"] == got["hardware"]
    assert "SLIMKERN_CPU_CAPABILITY='sse9' is not one of default, avx2, avx512" in err


def test_this_process_runs_the_requested_capability():
    # The capability runs of `make test` set SLIMKERN_CPU_CAPABILITY for the whole suite: this
    # makes sure the kernels there really ran the narrower path.
    cap = _library.cpu_capability()
    requested = os.environ.get("SLIMKERN_CPU_CAPABILITY", "").lower()
    if requested in _ORDER and _ORDER.index(requested) <= _ORDER.index(cap["hardware"]):
        assert cap["in_use"] == requested
    else:
        assert cap["in_use"] == cap["hardware"]


def test_info_prints_cpu_path():
    env = dict(os.environ, SLIMKERN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-m", "slimkern.info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    hw = _library.cpu_capability()["hardware"]
    assert f"CPU kernels           default (processor: {hw}; SLIMKERN_CPU_CAPABILITY=default)" in out
