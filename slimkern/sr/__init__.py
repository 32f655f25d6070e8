"""Super-resolution with slimmable / ParaDiS WDSR (ParaDiS, Ozerov et al., Appendix D).

- :mod:`slimkern.sr.metrics`: PSNR on the luminance channel (the SR papers' convention).
- :mod:`slimkern.sr.recipes`: the classification recipes with L1 losses: ParaDiS, US-Nets
  sandwich with in-place distillation, individual models.
- :mod:`slimkern.sr.experiment`: the paper's Figure 7 on scikit-image's photographs
  (``python -m slimkern.sr.experiment``).
"""
from slimkern.sr.metrics import psnr, psnr_y, rgb_to_y
from slimkern.sr.recipes import SRIndividualTrainer, SRParaDiSTrainer, SRSandwichTrainer

__all__ = ["psnr", "psnr_y", "rgb_to_y", "SRIndividualTrainer", "SRParaDiSTrainer", "SRSandwichTrainer"]
