"""Worker script of ``tests/test_ddp.py``, run as ``torchrun --nproc_per_node 2 ddp_runner.py OUT SPEC``.

Every process runs the steps of the JSON file ``SPEC`` in order, in one process group (gloo):

* ``{"tag": T, "argv": [...]}``: ``dnc.cli.main(argv)``, exactly what ``torchrun -m dnc`` runs (the
  first step creates the process group from torchrun's environment). A test hook around
  ``dnc.engine.train_loop`` saves each process's final model state to ``OUT/T_rank<r>.pt``, so that
  the processes can be compared with each other.
* ``{"tag": T, "units": true}``: the :data:`SCENARIOS` of ``SubCentroids.update``, each process on
  its own part of every global batch; results in ``OUT/T_rank<r>.pt``.
* ``"nan": [rank, step]`` in a step: a fault injection, the loss of that process (only) is NaN at
  that training step; ``"sigterm": [rank, step]``: that process (only) receives SIGTERM during that step.

Each step's return code goes to ``OUT/T_rank<r>.rc``; a step whose code is not ``"expect"`` (0 by
default) ends the run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# name: (num_classes, dim, K, SubCentroids options, number of steps)
SCENARIOS = {
    "mixed": (5, 8, 3, dict(momentum=0.5), 2),         # every class on both processes, unequal halves
    "disjoint": (5, 8, 3, dict(momentum=0.5), 2),      # classes 0-2 on process 0, 3-4 on process 1
    "memory": (4, 8, 3, dict(momentum=0.5, memory_size=48, update_interval=2), 4),  # a memory shard per process
}


def scenario_batches(name: str) -> list:
    """The global batches of a scenario: ``[(z, labels, correct, [indices of process 0, of process 1])]``."""
    c, d, _, _, steps = SCENARIOS[name]
    g = torch.Generator().manual_seed(list(SCENARIOS).index(name))
    out = []
    for _ in range(steps):
        n = 48 if name == "memory" else 96
        z = F.normalize(torch.randn(n, d, generator=g), dim=1)
        labels = torch.randint(0, c, (n,), generator=g)
        correct = torch.rand(n, generator=g) > 0.2
        if name == "disjoint":
            parts = [torch.nonzero(labels < 3).squeeze(1), torch.nonzero(labels >= 3).squeeze(1)]
        elif name == "mixed":
            parts = [torch.arange(0, 60), torch.arange(60, n)]
        else:
            parts = [torch.arange(0, n // 2), torch.arange(n // 2, n)]
        out.append((z, labels, correct, parts))
    return out


def make_subcentroids(name: str, world: int = 1):
    """The scenario's SubCentroids, identically initialised; with ``world=1`` the memory is the
    concatenation of the ``world`` processes' shards."""
    from dnc.centroids import SubCentroids
    c, d, k, kw, _ = SCENARIOS[name]
    kw = dict(kw)
    if "memory_size" in kw and world == 1:
        kw["memory_size"] *= 2
    torch.manual_seed(0)
    return SubCentroids(c, d, k, **kw)


def run_units(rank: int) -> dict:
    results = {}
    for name in SCENARIOS:
        sc = make_subcentroids(name, world=2)
        steps = []
        for z, labels, correct, parts in scenario_batches(name):
            idx = parts[rank]
            assign = sc.update(z[idx], labels[idx], correct[idx], sc.similarities(z[idx]))
            steps.append({"centroids": sc.centroids.clone(), "assign": assign})
        results[name] = {"steps": steps, "state": sc.state_dict()}
    return results


def _with_fault(kind: str, where, run):
    """Run ``run()`` with a fault on process ``rank`` at its training step ``at``: a NaN loss (``nan``) or a
    SIGTERM to that process alone (``sigterm``, as if only its node received it)."""
    import os
    import signal

    from dnc.models.classifier import Classifier
    rank, at = where
    forward, calls = Classifier.forward, []

    def faulty(self, images, targets=None):
        out = forward(self, images, targets)
        if targets is None or not self.training or dist.get_rank() != rank:
            return out
        calls.append(1)
        logits, losses = out
        if len(calls) == at and kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return logits, ({**losses, "ce": losses["ce"] * float("nan")} if len(calls) == at and kind == "nan" else losses)

    Classifier.forward = faulty
    try:
        return run()
    finally:
        Classifier.forward = forward


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(1)
    from dnc import cli, engine

    # One process group for all steps: keep cli.main from tearing it down in between.
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    train_loop, tag = engine.train_loop, {}

    def hooked(cfg, model, *args, **kwargs):
        result = train_loop(cfg, model, *args, **kwargs)
        state = {"model": engine.unwrap(model).state_dict(), "rng": torch.get_rng_state()}
        torch.save(state, out / f"{tag['name']}_rank{dist.get_rank()}.pt")
        return result

    engine.train_loop = hooked
    for step in spec:
        tag["name"] = step["tag"]
        if step.get("units"):
            torch.save(run_units(dist.get_rank()), out / f"{step['tag']}_rank{dist.get_rank()}.pt")
            rc = 0
        elif "nan" in step or "sigterm" in step:
            kind = "nan" if "nan" in step else "sigterm"
            rc = _with_fault(kind, step[kind], lambda: cli.main(step["argv"]))
        else:
            rc = cli.main(step["argv"])
        (out / f"{step['tag']}_rank{dist.get_rank() if dist.is_initialized() else 'X'}.rc").write_text(str(rc))
        if rc != step.get("expect", 0):
            sys.exit(rc or 1)
    dist.barrier()
    destroy()


if __name__ == "__main__":
    main()
