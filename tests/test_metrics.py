"""Top-k accuracy and MMSegmentation-style mIoU against hand-computed values."""
import math
import sys

import pytest
import torch

from dnc.metrics import Accuracy, SegMetric


def test_topk_accuracy_by_hand():
    logits = torch.tensor([
        [0.9, 0.05, 0.03, 0.02],   # target 0: top1 hit
        [0.1, 0.2, 0.6, 0.1],      # target 1: 2nd best -> top2 hit only
        [0.5, 0.3, 0.15, 0.05],    # target 3: last -> miss for top1/top2, hit for top5 (clamped to 4)
    ])
    target = torch.tensor([0, 1, 3])
    acc = Accuracy(topk=(1, 2, 5))
    acc.update(logits[:2], target[:2])
    acc.update(logits[2:], target[2:])
    result = acc.compute()
    assert result == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top5": 100.0})
    assert acc.compute() == result  # compute does not change the state
    acc.reset()
    assert math.isnan(acc.compute()["top1"])


def test_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        Accuracy().update(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


def test_miou_by_hand():
    # 3 classes + ignore. Pixels (target, pred):
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [2, 1, 0, 2]])
    # confusion[label, pred] over the 6 labelled pixels:
    #   label 0: pred 0 x2, pred 1 x1     label 1: pred 1 x2, pred 2 x1     label 2: none
    # class 0: I=2, U=3+2-2=3 -> 66.67   class 1: I=2, U=3+3-2=4 -> 50   class 2: I=0, U=0+1-0=1 -> 0
    metric = SegMetric(num_classes=3)
    metric.update(pred[None], target[None])
    assert metric.confusion.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    r = metric.compute()
    assert r["IoU"] == pytest.approx([200 / 3, 50.0, 0.0])
    assert r["mIoU"] == pytest.approx((200 / 3 + 50 + 0) / 3)
    assert r["aAcc"] == pytest.approx(4 / 6 * 100)
    assert r["Acc"][:2] == pytest.approx([200 / 3, 200 / 3]) and r["Acc"][2] is None  # class 2 never labelled
    assert r["mAcc"] == pytest.approx(200 / 3)


def test_absent_class_left_out_and_dataset_level_accumulation():
    metric = SegMetric(num_classes=4)
    # image 1: perfect on class 0; image 2: class 1 half right (other half predicted 0)
    metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    metric.update(torch.tensor([[[1, 0]]]), torch.tensor([[[1, 1]]]))
    r = metric.compute()
    # class 0: I=4, U=4+5-4=5 -> 80; class 1: I=1, U=2+1-1=2 -> 50; classes 2, 3 absent -> None
    assert r["IoU"][:2] == pytest.approx([80.0, 50.0]) and r["IoU"][2:] == [None, None]
    assert r["mIoU"] == pytest.approx(65.0)  # the mean of dataset-level IoUs, not of per-image means
    assert r["aAcc"] == pytest.approx(5 / 6 * 100)


def test_ignore_pixels_do_not_count_whatever_is_predicted():
    metric = SegMetric(num_classes=2, ignore_index=255)
    target = torch.full((2, 3, 3), 255)
    target[:, 0, 0] = 1
    metric.update(torch.ones_like(target), target)
    assert metric.confusion.sum() == 2
    assert metric.compute()["IoU"] == [None, 100.0]


def test_segmetric_rejects_out_of_range_labels():
    metric = SegMetric(num_classes=2)
    with pytest.raises(ValueError, match=r"label\(s\) \[7\]"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


def _dist_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        g = torch.Generator().manual_seed(0)
        logits, target = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
        pred, mask = torch.randint(0, 3, (4, 6, 6), generator=g), torch.randint(0, 3, (4, 6, 6), generator=g)
        acc, seg = Accuracy(topk=(1, 3)), SegMetric(3)
        acc.update(logits[rank::world_size], target[rank::world_size])   # each process sees half
        seg.update(pred[rank::world_size], mask[rank::world_size])
        result = {"acc": acc.compute(), "seg": seg.compute()}  # collective: every rank calls it
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform != "linux",
                    reason="needs torch.distributed (gloo) and fork")
@pytest.mark.timeout(120)  # two processes: a collective one never reaches fails here, not in CI's limit
def test_distributed_counts_are_summed(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2,
                       start_method="fork")
    got = torch.load(tmp_path / "out.pt")
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    pred, mask = torch.randint(0, 3, (4, 6, 6), generator=g), torch.randint(0, 3, (4, 6, 6), generator=g)
    acc, seg = Accuracy(topk=(1, 3)), SegMetric(3)
    acc.update(logits, target)
    seg.update(pred, mask)
    assert got["acc"] == pytest.approx(acc.compute())
    assert got["seg"]["mIoU"] == pytest.approx(seg.compute()["mIoU"])
    assert got["seg"]["IoU"] == pytest.approx(seg.compute()["IoU"])
