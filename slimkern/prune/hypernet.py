"""DWNP's mask hypernetwork: ``a^n = HN(Emb(n))`` for the server (n = 0) and devices 1..N.

Gao et al. (DWNP) generate every participant's architecture vector with one hypernetwork from
a learned embedding of the participant. Its shape follows AutoTrainOnce
(xidongwu/AutoTrainOnce, read, not copied): a sequence with one token per prunable layer
(here: width group), fixed orthogonal layer tokens ``[L, d]``, a bidirectional GRU, LayerNorm
+ ReLU, and one linear head per layer producing that layer's ``C_l`` logits; masks are
``gumbel_sigmoid((logits + offset), tau)`` with ATO's ``offset = 3`` (all masks start near 1:
training starts from the unpruned net) and ``tau = 0.4``.

The participant conditions the sequence additively: token ``l`` of participant ``n`` is
``layer_token_l + emb_n`` (``emb`` an ``nn.Embedding(N + 1, d)``, row 0 the server's), so one
GRU and one set of heads serve everyone, and participants differ only through their
embeddings -- which the server averages with the rest of the hypernetwork (FedAvg).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimkern.prune.gumbel import gumbel_sigmoid

__all__ = ["MaskHypernetwork"]


class MaskHypernetwork(nn.Module):
    """Masks for ``groups`` (``{name: C_g}``, in network order) for ``num_devices + 1``
    participants (row 0 = server).

    ``logits(n)`` -> ``{group: [C_g]}``; ``masks(n, hard=True, generator=None)`` ->
    straight-through Gumbel-sigmoid samples; ``deterministic_masks(n)`` -> the noise-free hard
    masks ``1[logits + offset >= 0]`` used to build the final pruned models.
    """

    def __init__(self, groups: dict[str, int], num_devices: int, embed_dim: int = 64, hidden: int = 128,
                 tau: float = 0.4, offset: float = 3.0, seed: int = 0):
        super().__init__()
        if not isinstance(groups, dict) or not groups:
            raise ValueError("MaskHypernetwork: groups must be a non-empty dict {group name: channels}")
        for g, c in groups.items():
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"MaskHypernetwork: group {g!r} needs a positive channel count, got {c!r}")
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"MaskHypernetwork: num_devices must be an int >= 1, got {num_devices!r}")
        for k, v in {"embed_dim": embed_dim, "hidden": hidden}.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MaskHypernetwork: {k} must be a positive int, got {v!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ValueError(f"MaskHypernetwork: tau must be > 0, got {tau!r}")
        self.names = list(groups)
        self.channels = [groups[g] for g in self.names]
        self.num_devices, self.tau, self.offset = num_devices, float(tau), float(offset)
        gen = torch.Generator().manual_seed(seed)
        L = len(self.names)
        tokens = torch.empty(max(L, embed_dim), embed_dim)
        tokens.copy_(torch.linalg.qr(torch.randn(max(L, embed_dim), embed_dim, generator=gen))[0])
        self.register_buffer("layer_tokens", tokens[:L].contiguous())  # fixed, orthogonal rows (ATO)
        self.embedding = nn.Embedding(num_devices + 1, embed_dim)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, 0.1, generator=gen)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.heads = nn.ModuleList([nn.Linear(2 * hidden, c) for c in self.channels])

    def _check(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_devices:
            raise ValueError(f"MaskHypernetwork: participant must be an int in [0, {self.num_devices}] "
                             f"(0 = server), got {n!r}")

    def logits(self, n: int) -> dict[str, torch.Tensor]:
        self._check(n)
        idx = torch.tensor([n], device=self.layer_tokens.device)
        seq = (self.layer_tokens + self.embedding(idx)).unsqueeze(0)  # [1, L, d]
        h, _ = self.gru(seq)
        h = torch.relu(self.norm(h[0]))  # [L, 2*hidden]
        return {g: head(h[l]) for l, (g, head) in enumerate(zip(self.names, self.heads))}

    def masks(self, n: int, hard: bool = True, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {g: gumbel_sigmoid(z + self.offset, self.tau, hard, generator) for g, z in self.logits(n).items()}

    @torch.no_grad()
    def deterministic_masks(self, n: int) -> dict[str, torch.Tensor]:
        return {g: (z + self.offset >= 0).float() for g, z in self.logits(n).items()}
