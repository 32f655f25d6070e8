"""slimkern.nn: slimmable / ParaDiS layers and the machinery to run switches.

Layers: ``SlimConv2d``, ``SlimWNConv2d`` (weight-normalised), ``SlimLinear``,
``SwitchableBatchNorm2d``, ``SlimBatchNorm1d``;
base class ``SlimNet``. Running: ``set_switch``, ``use_switch``, ``forward_switches``,
``register_switches``; ``calibrate_bn``; ``parameter_ranges``. See docs/nn_api.md.
"""
from slimkern.nn._base import SlimModule
from slimkern.nn.plan import Plan
from slimkern.nn.conv import SlimConv2d
from slimkern.nn.linear import SlimLinear
from slimkern.nn.weight_norm import SlimWNConv2d
from slimkern.nn.batchnorm import SwitchableBatchNorm2d, SlimBatchNorm1d
from slimkern.nn.switching import (as_switch, current_switches, forward_switches, register_switches,
                                   registered_switches, set_switch, slim_modules, use_switch)
from slimkern.nn.net import SlimNet
from slimkern.nn.calibrate import calibrate_bn
from slimkern.nn.ranges import parameter_ranges

__all__ = ["SlimModule", "Plan", "SlimConv2d", "SlimWNConv2d", "SlimLinear", "SwitchableBatchNorm2d",
           "SlimBatchNorm1d", "SlimNet", "as_switch", "current_switches", "forward_switches", "register_switches",
           "registered_switches", "set_switch", "slim_modules", "use_switch", "calibrate_bn",
           "parameter_ranges"]
