"""The README's Python examples run as pasted (each ```python block, in order, in a fresh
interpreter), and the "Using it" block computes what its comments claim."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_using_it_example():
    blocks = python_blocks(os.path.join(ROOT, "README.md"))
    assert any("sk.slimmify" in b and "sk.export" in b and "sk.profile" in b for b in blocks)


# Appended to the "Using it" block: its comments, checked against independent computations.
CHECKS = """
import copy
assert len(outs) == len(switches) and all(o.shape == (8, 10) for o in outs)
torch.manual_seed(0)
plain = torchvision.models.resnet18(weights=None, num_classes=10).eval()
slim = sk.slimmify(copy.deepcopy(plain), max_width=1.5).eval()
slim.set_switch(sk.Switch([1.0]))
with torch.no_grad():
    assert torch.allclose(slim(x), plain(x), atol=1e-4), "[1.0]x is the original model"
    with sk.use_switch(net, "[0.5, 0.5]x"):
        want = net(x)
    assert torch.allclose(dep(x), want, atol=1e-4), "the exported branches sum to the switch's logits"
print("README checks passed")
"""


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted():
    blocks = python_blocks(os.path.join(ROOT, "README.md"))
    assert blocks
    for k, code in enumerate(blocks):
        if "sk.slimmify" in code and "sk.export" in code:
            code = code + CHECKS
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"README python block {k} failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
        if code.endswith(CHECKS):
            assert "README checks passed" in r.stdout and "MMACs" in r.stdout
