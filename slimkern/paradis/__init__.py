"""ParaDiS experiments beyond the one-run demo (Ozerov, Lambert & Kumaraswamy, arXiv:2110.02724):
several seeds summarised as mean ± std (:mod:`~slimkern.paradis.seeds`), the US-Nets / fixed-width /
individual baselines of the paper's Tables 3-5, the Table-1 ablation and Figure 4 (right)."""
from slimkern.paradis.seeds import parse_seeds, run_seeds, summarize

__all__ = ["parse_seeds", "run_seeds", "summarize"]
