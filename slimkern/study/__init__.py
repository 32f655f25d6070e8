"""Experiments that answer the project's research questions (``slimkern study ...``).

``otfusion``: one-shot OT fusion of independently trained digits models (same width and
0.5x + 1.0x) against vanilla averaging. ``proposal``: the federated study of issue 17
(FedDF over distinct models, shared slimmable training, both, OT-aligned aggregation).
"""
