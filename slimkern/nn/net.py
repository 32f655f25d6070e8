"""``SlimNet``: an ``nn.Module`` base giving a net built from slim layers the switch methods."""
from __future__ import annotations

import torch.nn as nn

from slimkern.nn import switching


class SlimNet(nn.Module):
    """Base class for networks built from slimkern layers (``slimmify`` returns one too).

    Methods forward to the functions of ``slimkern`` with ``self`` as the net:
    ``set_switch(sw)`` (returns self, chainable), ``use_switch(sw)`` (context manager),
    ``forward_switches(x, switches, return_features=False)``, ``register_switches(sws)``;
    properties ``switch`` (the current single switch) and ``switches`` (registered ones).
    """

    def set_switch(self, sw) -> "SlimNet":
        return switching.set_switch(self, sw)

    def use_switch(self, sw):
        return switching.use_switch(self, sw)

    def forward_switches(self, x, switches, return_features: bool = False):
        return switching.forward_switches(self, x, switches, return_features)

    def register_switches(self, switches):
        return switching.register_switches(self, switches)

    @property
    def switch(self):
        sws = switching.current_switches(self)
        return sws[0] if len(sws) == 1 else sws

    @property
    def switches(self):
        return switching.registered_switches(self)
