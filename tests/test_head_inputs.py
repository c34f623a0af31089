"""The heads check what they are given: labels outside [0, C) (other than the ignore value) and features
of another width fail loudly, before anything moves; with labels in eval mode they return what they
return in training, and move nothing."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from dnc import DNCHead, LinearHead, PixelHead

C, D = 4, 8


def _state(head) -> dict:
    return {k: v.clone() for k, v in head.state_dict().items()}


def _unchanged(head, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in head.state_dict().items())


@pytest.mark.parametrize("bad", [[0, 1, 4, 2], [0, -3, 1, 2], [7, 9, 7, 0]])
def test_dnc_head_refuses_labels_outside_the_classes_and_moves_nothing(bad):
    torch.manual_seed(0)
    head = DNCHead(D, C, memory_size=16).train()
    before = _state(head)
    with pytest.raises(ValueError) as e:
        head(torch.randn(4, D), torch.tensor(bad))
    named = sorted({v for v in bad if not 0 <= v < C})
    assert str(named) in str(e.value) and f"[0, {C})" in str(e.value)
    assert _unchanged(head, before) and head.centroids.steps == 0
    head(torch.randn(4, D), torch.tensor([0, 1, -1, 3]))  # -1: ignored, accepted
    assert not _unchanged(head, before)


def test_the_label_check_can_be_turned_off_as_dnc_train_does_after_checking_the_data():
    head = DNCHead(D, C).train()
    head.check_labels = False
    head(torch.randn(4, D), torch.tensor([0, 1, 9, 2]))  # out-of-range labels take no part, as before


@pytest.mark.parametrize("make", [lambda: DNCHead(D, C), lambda: LinearHead(D, C)])
def test_features_of_another_width_name_the_head_and_both_widths(make):
    head = make()
    name = type(head).__name__
    with pytest.raises(ValueError, match=f"^{name}: features of shape \\(3, {D + 1}\\) have width {D + 1}, the head takes {D}"):
        head(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match=f"^{name}: label\\(s\\) \\[{C}\\] outside \\[0, {C}\\)"):
        head.train()(torch.randn(3, D), torch.tensor([0, C, 1]))  # labels are checked by default


def test_the_label_message_lists_ten_values_then_dots_and_minus_two_is_refused():
    head = DNCHead(D, C).train()
    with pytest.raises(ValueError, match=r"^DNCHead: label\(s\) \[-2\] outside \[0, 4\) \(1 of 3\); nothing was updated"):
        head(torch.randn(3, D), torch.tensor([0, -2, -1]))
    bad = torch.arange(C, C + 11)
    with pytest.raises(ValueError, match=r"label\(s\) \[4, 5, 6, 7, 8, 9, 10, 11, 12, 13\] ... outside"):
        head(torch.randn(11, D), bad)
    with pytest.raises(ValueError, match=r"label\(s\) \[4, 5, 6, 7, 8, 9, 10, 11, 12, 13\] outside"):
        head(torch.randn(10, D), bad[:10])


def test_a_dnc_head_in_training_mode_without_labels_warns_once():
    head = DNCHead(D, C).train()
    with pytest.warns(UserWarning, match="^DNCHead called in training mode without labels: the sub-centroids do not "
                                         "move. Call it as `logits, losses = head\\(x, target\\)` in training steps.$") as record:
        head(torch.randn(2, D))
    assert record[0].filename == __file__  # the warning names the caller, not torch's Module.__call__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head(torch.randn(2, D))


def test_the_linear_head_has_no_dropout_unless_asked():
    torch.manual_seed(0)
    x = torch.randn(5, D)
    plain, dropped = LinearHead(D, C).train(), LinearHead(D, C, dropout=0.5).train()
    torch.testing.assert_close(plain(x), plain.eval()(x))
    dropped.load_state_dict(plain.state_dict())
    assert not torch.allclose(dropped(x), plain(x))


def test_with_labels_in_eval_mode_the_heads_return_logits_and_losses_and_move_nothing():
    torch.manual_seed(0)
    for head in (DNCHead(D, C, contrast_weight=0.1), LinearHead(D, C)):
        head.eval()
        x, y = torch.randn(6, D), torch.tensor([0, 1, 2, 3, 0, 1])
        before = _state(head)
        logits, losses = head(x, y)
        torch.testing.assert_close(logits, head(x))
        assert losses == {} and _unchanged(head, before)
        with pytest.raises(ValueError, match=r"\[5\]"):  # checked in eval mode too
            head(x, torch.tensor([0, 1, 2, 5, 0, 1]))
        head.train()
        out = head(x, y)
        assert isinstance(out, tuple) and out[0].shape == logits.shape


def test_pixel_head_checks_the_map_its_width_and_the_labels_but_the_ignore_index():
    torch.manual_seed(0)
    head = PixelHead(DNCHead(D, C), ignore_index=255).train()
    x = torch.randn(2, D, 3, 5)
    with pytest.raises(ValueError, match=r"4-D feature map \(B, 8, H, W\), got shape \(2, 8, 15\)"):
        head(x.flatten(2))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\), got shape \(2, 6, 3, 5\)"):
        head(x[:, :6])
    with pytest.raises(ValueError, match=r"targets of shape \(2, 5, 3\)"):
        head(x, torch.zeros(2, 5, 3, dtype=torch.long))
    masks = torch.randint(0, C, (2, 3, 5))
    masks[0, 0, :2] = 255
    before = _state(head)
    bad = masks.clone()
    bad[1, 2, 4] = 17
    with pytest.raises(ValueError, match=r"\[17\]"):
        head(x, bad)
    assert _unchanged(head, before)
    logits, _ = head(x, masks)  # 255 pixels are ignored
    assert logits.shape == (2, C, 3, 5) and not _unchanged(head, before)
    head.eval()
    logits, losses = head(x, masks)
    torch.testing.assert_close(logits, head(x))
    assert losses == {}


def test_head_settings_reach_the_clustering_and_the_defaults_are_the_papers():
    head = DNCHead(D, C)
    sub = head.centroids
    assert (sub.k, sub.momentum, sub.eps, sub.iters, sub.correct_only, head.temperature) == (4, 0.999, 0.05, 3, True, 0.1)
    assert isinstance(head.feat_norm, torch.nn.LayerNorm) and head.mask_norm is None
    sub = DNCHead(D, C, num_subcentroids=2, sinkhorn_eps=0.2, sinkhorn_iters=5, correct_only=False).centroids
    assert (sub.k, sub.eps, sub.iters, sub.correct_only) == (2, 0.2, 5, False)
    from dnc.heads import build_head
    assert isinstance(build_head("linear", D, C, dropout=0.5).dropout, torch.nn.Dropout)
    for kwargs, message in (({"calibration": "softmax"}, "calibration must be 'temperature' or 'layernorm', got 'softmax'"),
                            ({"compact_weight": 0.1, "memory_size": 8},
                             "contrast_weight/compact_weight need the step's own assignment: use memory_size=0")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            DNCHead(D, C, **kwargs)
    with pytest.raises(ValueError, match="^unknown head 'mlp'; choose 'dnc' or 'linear'$"):
        build_head("mlp", D, C)
