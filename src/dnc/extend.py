"""Classes without retraining (``dnc extend``): add a class from a few images, remove a class.

A DNC classifier has no class weights: a class is K sub-centroids on the unit sphere. Adding a class
embeds its images with the frozen network (evaluation transform) and clusters them (k-means++ then
spherical k-means, the same as ``model.dnc.init=kmeans++``); removing one drops its sub-centroids.
Every other class keeps its sub-centroids bit for bit (unless ``--refit-old``), and the backbone is untouched.

Fewer distinct images than K. k-means then returns the same point several times, and a duplicate
sub-centroid never wins a sample (``argmax`` takes the first of equal scores): it is dead weight
in the decision and in the balanced clustering of later training. Each duplicate is therefore
replaced by a *jittered copy*: the point rotated by a small fixed angle (``JITTER_COS``, cosine
0.998, about 3.6 degrees) in a random direction orthogonal to it, then renormalised. The class's
decision region is unchanged up to that angle (far inside the gap to any other class of a trained
model), the K vectors are distinct, and if training resumes, the Sinkhorn assignment splits the
class's samples among them so that they move apart as real sub-patterns appear.

Old-class collapse. Old sub-centroids sit where the training samples of their class were *when they
were last updated* (with momentum 0.999 and few steps, near their start), whereas new ones are fitted
to the current embeddings exactly. On an under-trained network whose embeddings of all classes
crowd around one direction, a new class's sub-centroids lie close to that global mean and win the
images of the old classes too. ``--val`` measures it: the accuracy of the old classes on the
config's validation split before and after, the share of them taken by the new classes, and the mean
cosine of those images to their own class and to the new classes; a drop of more than
``WARN_DROP`` points prints a warning. ``--refit-old`` prevents it at the price of touching the old
classes: their sub-centroids are re-fitted (k-means++ and spherical k-means) on the current embeddings
of the config's training split, so that old and new classes are placed by the same rule on the same
embedding; otherwise, continue training from the extended checkpoint.

The written checkpoint has the new class list, ``data.num_classes`` in its config (and for an image
folder, ``data.dataset_kwargs.classes``, which fixes the label order), the head's buffers and per-class
parameters resized, any sub-centroid memory cleared (its labels were old class indices), and the
training state of the source (so ``dnc train CONFIG2 --resume CKPT2`` continues) when no parameter
changed shape. ``CKPT2.yaml`` beside it is that config, for ``dnc test``/``explain``/``train``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .centroids import kmeans_pp
from .embedding import embed, head_of
from .files import check_output, write_atomic
from .validate import check_class_names

__all__ = ["JITTER_COS", "WARN_DROP", "fit_subcentroids", "refine_subcentroids", "embed_files", "extend_model",
           "run_extend"]

JITTER_COS = 0.998
WARN_DROP = 5.0


def fit_subcentroids(z: torch.Tensor, groups: torch.Tensor, num_groups: int, k: int, iters: int = 10,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(num_groups, K, D)`` distinct unit sub-centroids of every group at once: k-means++ and
    spherical k-means on the unit embeddings ``z (N, D)`` of group ``groups (N,)``, then every
    duplicate of an earlier sub-centroid of its group replaced by a jittered copy (see the module
    docstring). Every group must have at least one sample. Without gradients (:func:`kmeans_pp`)."""
    counts = torch.bincount(groups, minlength=num_groups)
    if (counts == 0).any():
        raise ValueError(f"group {int((counts == 0).nonzero()[0])} has no embedding")
    centers, _ = kmeans_pp(F.normalize(z.float(), dim=-1), groups, num_groups, k, iters, generator)
    gram = torch.einsum("gkd,gjd->gkj", centers, centers)
    earlier = torch.ones(k, k, dtype=torch.bool, device=z.device).tril(-1)  # j < k
    dup = ((gram > 1 - 1e-6) & earlier).any(-1)                            # (G, K)
    noise = torch.randn(centers.shape, generator=generator).to(centers)
    noise = F.normalize(noise - (noise * centers).sum(-1, keepdim=True) * centers, dim=-1)  # orthogonal to p
    sin = (1 - JITTER_COS ** 2) ** 0.5
    jittered = JITTER_COS * centers + sin * noise
    return F.normalize(torch.where(dup[..., None], jittered, centers), dim=-1)


def refine_subcentroids(p: torch.Tensor, z: torch.Tensor, y: torch.Tensor, temperature: float, steps: int = 50,
                        lr: float = 1e-3) -> torch.Tensor:
    """A short refinement of the sub-centroids ``p (C, K, D)`` alone on frozen unit embeddings ``z (N, D)``
    of labels ``y (N,)`` (the old classes' training images and the new classes' shots): ``steps`` of
    Adam on the class-balanced cross-entropy of the head's logits ``max_k <z, p(c, k)> / temperature``,
    every sub-centroid kept on the unit sphere. It places old and new classes by one rule on the same
    embedding, against each other, so that a few-shot class takes only the region its images win."""
    counts = torch.bincount(y, minlength=p.shape[0]).float()
    weight = counts.sum() / (p.shape[0] * counts.clamp_min(1))
    q = p.detach().float().clone().requires_grad_()
    opt = torch.optim.Adam([q], lr=lr)
    z = z.float()
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("nd,ckd->nck", z, F.normalize(q, dim=-1)).amax(-1) / temperature
            loss = F.cross_entropy(logits, y, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return F.normalize(q.detach(), dim=-1).to(p.dtype)


def embed_files(cfg, model: nn.Module, files: Sequence[str], device: torch.device) -> torch.Tensor:
    """Unit embeddings ``(N, D)`` of image files with the frozen model (evaluation transform)."""
    from torch.utils.data import DataLoader

    from .data.classification import collate
    from .data.images import ImageList
    from .tasks import eval_transform
    loader = DataLoader(ImageList(files, eval_transform(cfg)), batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                        num_workers=cfg.data.num_workers, collate_fn=collate)
    return embed(model, loader, device)[0]


def _head_prefix(model: nn.Module) -> tuple:
    """``(head, "name.of.head.")`` of a classifier's DNC head."""
    head = head_of(model)
    name = next(n for n, m in model.named_modules() if m is head)
    return head, (name + "." if name else "")


def extend_model(cfg, model: nn.Module, classes: Sequence[str], added: dict, removed: Sequence[str],
                 seed: int = 0, refit: Optional[tuple] = None) -> tuple:
    """The extended model: ``(cfg2, model2, classes2)``.

    ``added``: ``{name: (N, D) unit embeddings}`` of each new class (appended in that order);
    ``removed``: names of classes to drop. Kept classes keep their sub-centroids exactly; every other
    per-class tensor of the head is indexed the same way (a new class gets the mean of the kept
    classes' values: e.g. the LayerNorm calibration's affine); the memory is cleared.
    ``refit``: ``(z (N, D), labels (N,))`` embeddings of the old classes' training images: their
    sub-centroids are then re-fitted on the current embedding as well (``--refit-old``).
    """
    from .config import from_dict, to_dict
    from .tasks import build_model

    classes = list(classes)
    for name in added:
        if name in classes:
            raise ValueError(f"--add {name}: class {name!r} exists already")
    for name in removed:
        if name not in classes:
            raise ValueError(f"--remove {name}: no class {name!r}; classes: {', '.join(classes)}")
    if len(set(removed)) != len(removed):
        raise ValueError("--remove: a class is named twice")
    keep = [i for i, c in enumerate(classes) if c not in removed]
    classes2 = [classes[i] for i in keep] + list(added)
    if not classes2:
        raise ValueError("--remove: no class would be left")
    head, prefix = _head_prefix(model)
    sub = head.centroids
    c_old, k = sub.centroids.shape[:2]
    p_old = sub.centroids.detach()
    if refit is not None:
        p_old = fit_subcentroids(refit[0].to(p_old), refit[1].to(p_old.device), c_old, k,
                                 generator=torch.Generator().manual_seed(seed + 1))
    if added:
        z = torch.cat([added[n] for n in added]).to(p_old)
        groups = torch.cat([torch.full((len(added[n]),), i, dtype=torch.long) for i, n in enumerate(added)]).to(z.device)
        p_new = fit_subcentroids(z, groups, len(added), k, generator=torch.Generator().manual_seed(seed))
    else:
        p_new = p_old.new_zeros(0, k, p_old.shape[-1])
    centroids = torch.cat([p_old[keep], p_new.to(p_old)])

    data = to_dict(cfg)
    data["data"]["num_classes"] = len(classes2)
    if cfg.data.dataset == "imagefolder":
        data["data"]["dataset_kwargs"] = {**data["data"]["dataset_kwargs"], "classes": classes2}
    cfg2 = from_dict(type(cfg), data).validate()
    model2 = build_model(cfg2, pretrained="").to(p_old.device)
    sub_prefix = prefix + next(n for n, m in head.named_modules() if m is sub) + "."
    model2.load_state_dict(_resized_state(model.state_dict(), model2.state_dict(), prefix, sub_prefix, keep,
                                          len(added), centroids))
    return cfg2, model2, classes2


def _resized_state(old: dict, fresh: dict, prefix: str, sub_prefix: str, keep: list, n_added: int,
                   centroids: torch.Tensor) -> dict:
    """The state dict of the extended model: ``centroids`` for the sub-centroids, a fresh memory, the kept
    rows of every other per-class tensor of the head (``prefix``) followed by their mean for each new class,
    and everything else unchanged."""
    c_old = old[sub_prefix + "centroids"].shape[0]
    index = torch.tensor(keep, dtype=torch.long)
    state = {}
    for key, value in fresh.items():
        before = old[key]
        if key == sub_prefix + "centroids":
            state[key] = centroids
        elif key.startswith(sub_prefix + "memory_"):
            state[key] = value  # a fresh, empty memory: its labels were indices of the old classes
        elif (key.startswith(prefix) and torch.is_tensor(before) and before.ndim >= 1 and before.shape[0] == c_old
              and (key.startswith(sub_prefix) or key.startswith(prefix + "mask_norm."))):
            kept = before[index.to(before.device)]
            extra = before[index.to(before.device)].float().mean(0, keepdim=True).to(before.dtype)
            state[key] = torch.cat([kept, extra.expand(n_added, *before.shape[1:])])
        else:
            state[key] = before
    return state


def _old_class_check(cfg, model, model2, classes, classes2, added, device) -> dict:
    """Accuracy of the kept old classes on the config's validation split, before and after."""
    from .engine import DistInfo
    from .ood import score_loader
    from .tasks import build_datasets, build_eval_loader
    val = build_datasets(cfg, ("val",))[0]["val"]
    loader = build_eval_loader(cfg, val, DistInfo(0, 1, device))
    _, labels, before = score_loader(model, loader, device)
    _, _, after = score_loader(model2, loader, device)
    to_new = torch.tensor([classes2.index(c) if c in classes2 else -1 for c in classes])
    new_label = to_new[labels]
    kept = new_label >= 0
    n = int(kept.sum())
    if not n:
        return {}
    first_new = len(classes2) - len(added)
    z = embed(model2, loader, device)[0][kept.to(device)]
    sims = head_of(model2).centroids.similarities(z).float().amax(-1)  # (N, C2)
    own = sims.gather(1, new_label[kept][:, None].to(sims.device)).squeeze(1)
    out = {"images": n,
           "top1_before": round(100 * float((to_new[before[kept]] == new_label[kept]).double().mean()), 4),
           "top1_after": round(100 * float((after[kept] == new_label[kept]).double().mean()), 4),
           "taken_by_new": round(100 * float((after[kept] >= first_new).double().mean()), 4),
           "cos_own": round(float(own.mean()), 4)}
    if added:
        out["cos_new"] = round(float(sims[:, first_new:].amax(1).mean()), 4)
    return out


def _training_embeddings(cfg, model, device) -> tuple:
    """Embeddings of the config's training split (evaluation transform) for ``--refit-old``."""
    from .engine import DistInfo
    from .tasks import build_cls_split, build_eval_loader, cls_transform, training_subset
    train = training_subset(cfg, build_cls_split(cfg, "train", cls_transform(cfg, False)))
    return embed(model, build_eval_loader(cfg, train, DistInfo(0, 1, device)), device)


def run_extend(cfg, checkpoint, folders: dict, remove: Sequence[str], out, val: bool = False,
               device: str = "auto", refit_old: bool = False, force: bool = False) -> dict:
    """``dnc extend``: adds a class ``name`` from the images under each ``folders[name]``, drops the classes
    ``remove``; writes ``out`` (checkpoint) and ``out`` with suffix ``.yaml`` (its config); returns a summary (classes, images per added class, and with ``val`` the old-class check)."""
    from .config import to_dict
    from .data.images import list_images
    from .engine import load_checkpoint, save_checkpoint, setup_one_process
    from .runconfig import checkpoint_classes
    from .tasks import load_trained_model

    if cfg.task != "classification" or cfg.model.head != "dnc":
        raise ValueError(f"dnc extend needs a DNC classifier (this config: {cfg.task}, {cfg.model.head} head)")
    if not folders and not remove:
        raise ValueError("dnc extend: nothing to do; give --add NAME=DIR or --remove NAME")
    out = Path(out)
    if out.suffix != ".pt":
        raise ValueError(f"--out {out}: use a .pt file")
    check_output(out, [checkpoint], force)
    check_class_names(folders, "--add")
    files = {name: list_images(folder) for name, folder in folders.items()}  # every folder checked first
    info = setup_one_process("dnc extend", device if device != "auto" else cfg.train.device)
    ckpt = load_checkpoint(checkpoint)
    model = load_trained_model(cfg, ckpt, checkpoint).to(info.device).eval()
    classes = checkpoint_classes(ckpt, cfg, checkpoint)
    added = {name: embed_files(cfg, model, fs, info.device) for name, fs in files.items()}
    refit = _training_embeddings(cfg, model, info.device) if refit_old else None
    cfg2, model2, classes2 = extend_model(cfg, model, classes, added, list(remove or []), cfg.train.seed, refit)

    state = {k: v for k, v in ckpt.items() if k not in ("format", "per_process", "ood", "anchored", "anchor_index",
                                                        "anchor_cosine", "anchor_names")}
    reshaped = [n for n, p in model.named_parameters() if p.shape != dict(model2.named_parameters())[n].shape]
    if reshaped:  # the optimiser state no longer fits: the checkpoint initialises, it does not resume
        for key in ("optimizer", "scheduler", "scaler", "train_state", "rng"):
            state.pop(key, None)
    state.update(model=model2.state_dict(), config=to_dict(cfg2), classes=classes2, world=1, metrics={},
                 extended={"source_checkpoint": str(checkpoint), "added": {n: len(f) for n, f in files.items()},
                           "removed": list(remove or []), "refit_old": refit_old})
    summary = {"classes": classes2, "added": {n: len(f) for n, f in files.items()}, "removed": list(remove or []),
               "resumable": not reshaped}
    if val:
        summary["old_classes"] = _old_class_check(cfg, model, model2, classes, classes2, added, info.device)
    config_path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, state)
    write_atomic(config_path, yaml.safe_dump(to_dict(cfg2), sort_keys=False).encode())
    summary["config"] = str(config_path)
    return summary
