"""Under DDP the k-means++ start is built from every process's embeddings (docs/ALGORITHM.md,
"Initialisation"): two CPU processes (gloo) under torchrun, class 3 on process 1 only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddp_init_runner import C, D, K, shards
from dnc.centroids import SubCentroids
from dnc_tiny import one_thread, run_torchrun

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
pytestmark = pytest.mark.timeout(240)  # torchrun, two processes (its own limit: 120 s)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("ddp_init")
    run_torchrun(Path(__file__).with_name("ddp_init_runner.py"), out, timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("iters", [0, 10])
def test_the_start_is_identical_everywhere_and_equals_one_process_on_all_embeddings(ranks, iters):
    a, b = ranks[0][iters], ranks[1][iters]
    assert torch.equal(a["centroids"], b["centroids"]), "processes start from different sub-centroids"
    (z0, y0), (z1, y1) = shards()[0]
    torch.manual_seed(0)
    single = SubCentroids(C, D, K)
    assert torch.equal(single.centroids, a["start"])
    single.init_from_embeddings(torch.cat([z0, z1]), torch.cat([y0, y1]), iters=iters,
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["centroids"], single.centroids, atol=1e-6, rtol=0)


def test_a_class_seen_by_process_1_only_starts_from_its_embeddings(ranks):
    (_, _), (z1, y1) = shards()[0]
    means = shards()[1]
    seeds = ranks[0][0]["centroids"][3]      # iters=0: the seeds are samples
    assert ((seeds @ z1[y1 == 3].t()).amax(1) > 1 - 1e-6).all(), "class 3's seeds are not process 1's samples"
    assert not torch.equal(ranks[0][0]["centroids"][3], ranks[0][0]["start"][3])
    final = ranks[0][10]["centroids"][3]
    cos = final @ means[3].t()               # one sub-centroid on each planted sub-cluster of class 3
    assert (cos.amax(0) > 0.99).all() and (cos.amax(1) > 0.99).all(), cos
