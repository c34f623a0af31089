#!/usr/bin/env python
"""Issue 20, open set: every post-hoc score of both heads on the CIFAR-10 6/4 split, chosen on validation.

    python benchmarks/openset_posthoc.py --work-dir W [--seeds 0 1 2] [--models dnc linear ...] [--out JSON]

Reads ``W/<model>_seed<S>/feats.pt`` (``cifar_features.py``: fp32 backbone features of one pass per
model) and applies each model's own head to them. Known = the 6 trained classes, unknown = cat, frog,
horse, ship. For every score and setting it computes AUROC and FPR at 95% TPR on the validation open set
(1,800 held-out known / 1,200 unknown training-folder images) and on the test open set (the 5,000
carved test images); the best setting of each family and the best score of each model are chosen on
the validation mean over seeds only, and their test figures are reported.

Scores (higher = more known): ``msp``, ``maxlogit``, ``energy`` (logsumexp of the logits), ``knn`` (Sun
et al. 2022: the k-th nearest training feature, L2-normalised backbone features, k=50 and a k sweep),
and for DNC heads ``cosine`` (the max sub-centroid cosine), ``subenergy`` (T * logsumexp over all C*K
sub-centroid cosines / T), ``knn_z`` (k-th neighbour in the head's unit embedding), ``cos_knn``
(cosine + the k-th neighbour cosine in the head's embedding, equal units) and ``cos_norm`` (cosine +
b * log of the backbone feature norm, which the DNC head's normalisation discards).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402  (also puts this checkout's dnc first on the path)
from dnc.ood import auroc, fpr_at_tpr, knn_scores, subcentroid_energy  # noqa: E402

K_SWEEP = (1, 5, 10, 20, 50, 100, 200)
T_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2)
B_SWEEP = (0.05, 0.1, 0.2, 0.5, 1.0)


def load_head(run_dir: Path):
    from dnc.engine import load_checkpoint
    from dnc.runconfig import checkpoint_config
    from dnc.tasks import load_trained_model
    ckpt = load_checkpoint(run_dir / "last.pt")
    cfg = checkpoint_config(ckpt, run_dir / "last.pt")
    return load_trained_model(cfg, ckpt, run_dir / "last.pt").eval().head


@torch.no_grad()
def all_scores(head, feats: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor) -> tuple:
    """``(logits, {name: (N,)})`` of every score and setting on backbone features ``feats``."""
    f_unit, b_unit = F.normalize(feats, dim=-1), F.normalize(bank, dim=-1)
    out = {}
    if hasattr(head, "centroids"):
        z, zb = head.embed(feats), head.embed(bank)
        sims = head.centroids.similarities(z).float()
        logits = head.calibrate(sims.amax(-1))
        cos = sims.amax(-1).amax(-1)
        out["cosine"] = cos
        for t in T_SWEEP:
            out[f"subenergy T={t}"] = subcentroid_energy(sims, t)
        knn_z = {k: knn_scores(z, zb, k) for k in K_SWEEP}
        for k in K_SWEEP:
            out[f"knn_z k={k}"] = knn_z[k]
            out[f"cos_knn k={k}"] = cos + knn_z[k]
        lognorm = feats.norm(dim=-1).log()
        for b in B_SWEEP:
            out[f"cos_norm b={b}"] = cos + b * lognorm
            out[f"subenergy_norm T=0.1,b={b}"] = out["subenergy T=0.1"] + b * lognorm
        # per-class calibration from the training images (the bank): each class's cosines standardised by
        # the mean and spread of its own training images' cosines to it
        bank_best = head.centroids.similarities(zb).float().amax(-1)          # (M, C)
        yb = bank_labels
        mu = torch.stack([bank_best[yb == c, c].mean() for c in range(bank_best.shape[1])])
        sd = torch.stack([bank_best[yb == c, c].std() for c in range(bank_best.shape[1])])
        class_cos = sims.amax(-1)
        out["cos_classnorm"] = ((class_cos - mu) / sd).amax(1)
        out["cos_classshift"] = (class_cos - mu).amax(1)
    else:
        logits = head(feats).float()
    out["msp"] = logits.softmax(1).amax(1)
    out["maxlogit"] = logits.amax(1)
    out["energy"] = logits.logsumexp(1)
    for k in K_SWEEP:
        out[f"knn k={k}"] = knn_scores(f_unit, b_unit, k)
    return logits, out


def family(name: str) -> str:
    return name.split(" ")[0]


def evaluate(run_dir: Path) -> dict:
    data = torch.load(run_dir / "feats.pt")
    head = load_head(run_dir)
    bank, bank_labels = data["bank"]
    res = {"scores": {}}
    for split in ("val", "test"):
        (fk, yk), (fu, _) = data[f"{split}_known"], data[f"{split}_unknown"]
        logits, sk = all_scores(head, fk, bank, bank_labels)
        _, su = all_scores(head, fu, bank, bank_labels)
        res[f"{split}_top1"] = round(100 * float((logits.argmax(1) == yk).double().mean()), 4)
        for name in sk:
            fpr, _ = fpr_at_tpr(sk[name], su[name])
            res["scores"].setdefault(name, {})[split] = {"auroc": round(100 * auroc(sk[name], su[name]), 4),
                                                         "fpr95": round(100 * fpr, 4)}
    return res


def mean(xs: list) -> float:
    return statistics.mean(xs)


def summarise(results: dict, models: list, seeds: list, closed: str = "top1") -> dict:
    """Per model: every score's mean over seeds; per family the setting best on validation; the best family.
    ``closed``: the closed-set figure of each run (``val_<closed>``, ``test_<closed>``)."""
    out = {}
    for m in models:
        runs = [results[f"{m}_seed{s}"] for s in seeds]
        table = {}
        for name in runs[0]["scores"]:
            row = {}
            for split in ("val", "test"):
                for metric in ("auroc", "fpr95"):
                    vals = [r["scores"][name][split][metric] for r in runs]
                    row[f"{split}_{metric}"] = [round(mean(vals), 2), round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0]
            table[name] = row
        best_of_family = {}
        for name, row in table.items():
            f = family(name)
            if f not in best_of_family or row["val_auroc"][0] > table[best_of_family[f]]["val_auroc"][0]:
                best_of_family[f] = name
        best = max(best_of_family.values(), key=lambda n: table[n]["val_auroc"][0])
        out[m] = {**{f"{split}_{closed}": round(mean([r[f"{split}_{closed}"] for r in runs]), 2) for split in ("val", "test")},
                  "scores": table, "best_of_family": best_of_family, "best_on_val": best}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["dnc", "linear"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    results = {f"{m}_seed{s}": evaluate(args.work_dir / f"{m}_seed{s}") for m in args.models for s in args.seeds}
    summary = summarise(results, args.models, args.seeds)
    print("| model | score (setting chosen on validation) | val AUROC | test AUROC | test FPR95 |")
    print("| --- | --- | --- | --- | --- |")
    for m, s in summary.items():
        for f, name in s["best_of_family"].items():
            r = s["scores"][name]
            mark = "**" if name == s["best_on_val"] else ""
            print(f"| {m} (top-1 {s['test_top1']:.2f}) | {mark}{name}{mark} | {r['val_auroc'][0]:.2f} | "
                  f"{r['test_auroc'][0]:.2f} ± {r['test_auroc'][1]:.2f} | {r['test_fpr95'][0]:.2f} ± {r['test_fpr95'][1]:.2f} |")
    full = {"seeds": args.seeds, "summary": summary, "per_run": results}
    if args.out:
        write_json(args.out, full)
    return full


if __name__ == "__main__":
    main()
