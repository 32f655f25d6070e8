"""slimkern: slimmable and ParaDiS networks with C++/CUDA/Triton kernels.

The public face (see DESIGN.md): ``Switch``, ``slimmify``, ``set_switch``, ``use_switch``,
``forward_switches``, ``calibrate_bn``, ``export``, ``profile``, ``evaluate``, ``choose_switch``,
and the namespaces ``ops``, ``solvers``, ``nn``, ``models``, ``data``, ``train``, ``fl``, ``nas``, ``prune``.
"""
__version__ = "0.1.0"

from slimkern import _library  # noqa: F401  (loads the extension, warns when it cannot)
from slimkern import ops, solvers
from slimkern.switch import Switch
from slimkern import nn
from slimkern.nn import calibrate_bn, forward_switches, set_switch, use_switch
from slimkern.profile import profile
from slimkern.export import export
from slimkern.slimmify import slimmify
from slimkern.evaluate import evaluate
from slimkern import data, fl, models, train  # noqa: E402  (namespaces built on the names above)
from slimkern.fl.budget import choose_switch  # noqa: E402
from slimkern import nas  # noqa: E402  (width search: slimkern.nas)
from slimkern import prune  # noqa: E402  (channel pruning, DAC, DWNP: slimkern.prune)

__all__ = [
    "Switch", "slimmify", "set_switch", "use_switch", "forward_switches", "calibrate_bn", "export",
    "profile", "evaluate", "ops", "solvers", "nn", "models", "data", "train", "fl", "choose_switch",
    "nas", "prune",
]
