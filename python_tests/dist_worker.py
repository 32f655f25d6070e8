"""One rank of the data-parallel tests (python_tests/test_train_distributed.py), started by
``slimkern.train.distributed.launch`` or torchrun; also imported by the test for its
single-process references.

    python dist_worker.py steps OUT [--no-sync-bn]   3 steps of each recipe; rank r saves OUT/rank<r>.pt
    python dist_worker.py fit OUT CKPT EPOCHS [--stall-after E]
                                                    fit(resume=True); rank 0 saves OUT/final.pt;
                                                    with --stall-after, rank 0 writes OUT/stalled
                                                    after epoch E's checkpoint and waits to be killed
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_slim_nets import TinyResNet  # noqa: E402

SWITCHES = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
RANK_BATCH = 32
N_SAMPLES = 200  # 3 global batches of 64 (the tail of 8 is dropped, as one process drops it)


def dataset(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (N_SAMPLES,), generator=g)
    return TensorDataset(x, y)


RECIPES = ("paradis", "sandwich")


def trainer(distributed=None, checkpoint=None, seed: int = 0, recipe: str = "paradis"):
    """A tiny residual net trained by ParaDiS Algorithm 1 (wide teacher [1.2], KD, activation
    MSE) or the US-Nets sandwich rule (random widths: BN rows appear during training)."""
    from slimkern.train import ParaDiSTrainer, SandwichTrainer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyResNet(c=8, max_width=1.2)
    kw = dict(lr=0.1, weight_decay=5e-4, schedule="cosine", seed=seed, checkpoint=checkpoint, progress=False,
              distributed=distributed)
    if recipe == "sandwich":
        # continuous widths: on a grid two draws of one step can coincide, which forward_switches refuses
        return SandwichTrainer(net, max_width=1.2, min_width=0.25, n_random=2, width_step=None, **kw)
    return ParaDiSTrainer(net, SWITCHES, beta=1.0, kd="wide", **kw)


def run_steps(t, batch_size: int, steps: int = 3) -> dict:
    """``steps`` training steps as ``fit`` runs them (same loader and schedule); the averaged
    gradients after step 1 and the full state after the last step."""
    from slimkern.train.optim import make_scheduler

    data = dataset()
    loader = t.make_loader(data, batch_size)
    t.scheduler = make_scheduler(t.optimizer, t.schedule, 2 * len(loader), len(loader))
    if t.distributed is not None:
        t.distributed.sync_trainer(t)
    out = {"steps_per_epoch": len(loader), "losses": []}
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        out["losses"].append(t.train_step(x, y)["loss"])
        if i == 0:
            out["grads"] = {n: p.grad.clone() for n, p in t.net.named_parameters() if p.grad is not None}
    out["state"] = {k: v.clone() for k, v in t.net.state_dict().items() if isinstance(v, torch.Tensor)}
    return out


def main(argv: list[str]) -> int:
    from slimkern.train import distributed as D
    from slimkern.train.checkpoint import atomic_save

    torch.set_num_threads(1)
    mode, out = argv[0], argv[1]
    dp = D.init_from_env("gloo", sync_bn="--no-sync-bn" not in argv)
    try:
        if mode == "steps":
            res = {recipe: run_steps(trainer(dp, recipe=recipe), RANK_BATCH) for recipe in RECIPES}
            res["rank"], res["world_size"] = dp.rank, dp.world_size
            atomic_save(res, os.path.join(out, f"rank{dp.rank}.pt"))
            return 0
        ckpt, epochs = argv[2], int(argv[3])
        with open(os.path.join(out, f"pid{dp.rank}"), "w") as f:
            f.write(str(os.getpid()))
        stall = int(argv[argv.index("--stall-after") + 1]) if "--stall-after" in argv else None

        def on_epoch_end(t, record):
            if stall is not None and t.epoch == stall and dp.is_main:
                open(os.path.join(out, "stalled"), "w").close()
                time.sleep(300)  # the test kills the whole job here

        t = trainer(dp, checkpoint=ckpt)
        t.fit(dataset(), epochs, batch_size=RANK_BATCH, resume=True, on_epoch_end=on_epoch_end)
        if dp.is_main:
            atomic_save({"state": t.net.state_dict(), "epoch": t.epoch, "history": t.history},
                        os.path.join(out, "final.pt"))
        return 0
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
