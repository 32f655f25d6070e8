"""``slimkern.prune``: physical channel pruning and the methods that choose what to prune.

* ``prune_channels(model, keep)``: kept channel indices per width group -> a smaller plain
  torch model (the core, shared by DAC and DWNP; DESIGN.md "Pruning").
* ``channel_groups(net)``: the width groups (residual-tied layers share one) and their layers.
* ``apply_masks(net, masks)``: the masked model (channel masks on group feature maps), which the
  pruned model equals for 0/1 masks.
* ``pruned_profile(net, keep, input_size)``: MACs / params / peak activation of the masked net,
  equal to ``slimkern.profile(prune_channels(net, keep))`` without building it.
* DAC (Li & Sanyal): ``DepthwiseGates``, ``entropy_loss``, ``bound_loss``, ``dac_compress``
  (Algorithm 1 with a guard: one compressed model per budget).
* DWNP (Gao et al.): ``gumbel_sigmoid`` (straight-through), ``FlopsModel`` (the differentiable
  ``T(a)``), ``MaskHypernetwork`` (embeddings -> GRU -> per-layer heads), ``dwnp_objective``
  (eq. 4) with ``resource_regularizer``.
* Federated: ``dac_federated`` (DAC + clustered FedAvg), ``dwnp_federated`` (DWNP's bilevel loop);
  ``slimkern prune dac|dwnp`` runs them on digits and writes a run folder (docs/prune.md);
  ``slimkern fl --strategy dwnp`` runs DWNP on the fl command's clients (``slimkern.fl.dwnp``).
"""
from slimkern.prune.budget import Budget, parse_budgets
from slimkern.prune.channels import prune_channels
from slimkern.prune.cost import pruned_profile
from slimkern.prune.dac import DACResult, DACState, dac_compress
from slimkern.prune.dac_federated import dac_federated
from slimkern.prune.dac_losses import bound_loss, entropy_loss
from slimkern.prune.dwnp_federated import dwnp_federated
from slimkern.prune.dwnp_objective import dwnp_objective, resource_regularizer
from slimkern.prune.flops import FlopsModel
from slimkern.prune.gates import DepthwiseGates
from slimkern.prune.gumbel import gumbel_sigmoid
from slimkern.prune.hypernet import MaskHypernetwork
from slimkern.prune.groups import Group, channel_groups
from slimkern.prune.keep import keep_masks, normalize_keep
from slimkern.prune.masks import apply_masks

__all__ = ["Budget", "DACResult", "DACState", "DepthwiseGates", "FlopsModel", "Group", "MaskHypernetwork",
           "apply_masks", "bound_loss", "channel_groups", "dac_compress", "dac_federated", "dwnp_federated", "dwnp_objective", "entropy_loss",
           "gumbel_sigmoid", "keep_masks", "normalize_keep", "parse_budgets", "prune_channels", "pruned_profile",
           "resource_regularizer"]
