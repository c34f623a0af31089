#!/usr/bin/env python
"""Issue 20, class addition: the 6-class CIFAR-10 twins learn the other 4 classes from 1/5/20/100 images.

    python benchmarks/fewshot_addition.py --work-dir W [--seeds 0 1 2] [--draws 3] [--shots 1 5 20 100] [--out JSON]

Reads ``W/<model>_seed<S>/feats.pt`` (``cifar_features.py``: fp32 backbone features, one pass per model).
Per model seed and draw, ``n`` shots of each new class (cat, frog, horse, ship) are drawn (seeded) from
150 training images of that class; every method predicts 10-way on the validation images (tuning) and on
the 5,000 carved test images of all 10 classes (reported): old / new / all top-1 and the share of old
images now called a new class. Methods:

* ``extend``: ``dnc.extend.extend_model`` as ``dnc extend --add`` runs it (k-means++ and spherical
  k-means of each new class's unit embeddings into K sub-centroids, old ones kept bit for bit);
* ``ncm``: nearest class mean on the same unit embedding (old means from the training subset);
* ``logreg``: class-balanced logistic regression (scikit-learn, L2, C chosen on validation) on the
  frozen backbone features, trained on the training subset of the old classes and the shots;
* the same baselines on the linear twin's features (``linear ncm``, ``linear logreg``);
* ``extend+`` variants (see ``dnc.extend``): fewer sub-centroids for few-shot classes, a per-class
  calibration of the new classes' cosines, and a short refinement of all sub-centroids on frozen
  embeddings of the old classes' memory and the shots; their settings chosen on validation only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402  (also puts this checkout's dnc first on the path)

NUM_OLD, NUM_NEW = 6, 4
LOGREG_C = (0.1, 1.0)
REFINE = ((50, 1e-3), (50, 3e-3))  # (steps, Adam lr), chosen on validation
MEMORY_PER_CLASS = 100  # old-class memory of the refinement: this many training embeddings per class


def load(run_dir: Path):
    from dnc.engine import load_checkpoint
    from dnc.runconfig import checkpoint_config
    from dnc.tasks import load_trained_model
    ckpt = load_checkpoint(run_dir / "last.pt")
    cfg = checkpoint_config(ckpt, run_dir / "last.pt")
    model = load_trained_model(cfg, ckpt, run_dir / "last.pt").eval()
    return cfg, model, list(ckpt.get("classes") or [])


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> dict:
    old, new = y < NUM_OLD, y >= NUM_OLD
    pc = lambda m: round(100 * float((pred[m] == y[m]).double().mean()), 4)  # noqa: E731
    return {"old": pc(old), "new": pc(new), "all": pc(torch.ones_like(old)),
            "old_to_new": round(100 * float((pred[old] >= NUM_OLD).double().mean()), 4)}


def nearest(p: torch.Tensor, z: torch.Tensor, bias: torch.Tensor = None) -> torch.Tensor:
    """Class of the nearest sub-centroid of ``p (C, K, D)`` for unit ``z``, minus a per-class ``bias``."""
    s = torch.einsum("nd,ckd->nck", z, p).amax(-1)
    return (s - bias if bias is not None else s).argmax(1)


def logreg(x_tr, y_tr, x_ev_list, c: float) -> list:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(x_tr.numpy())
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=300).fit(sc.transform(x_tr.numpy()), y_tr.numpy())
    return [torch.as_tensor(clf.predict(sc.transform(x.numpy()))) for x in x_ev_list]


def run_seed(run_dirs: dict, shots: list, draws: int, seed: int) -> list:
    from dnc.extend import extend_model, refine_subcentroids
    torch.set_num_threads(2)
    rows = []
    cfg, model, classes = load(run_dirs["dnc"])
    head = model.head
    data = torch.load(run_dirs["dnc"] / "feats.pt")
    lin = torch.load(run_dirs["linear"] / "feats.pt")
    with torch.no_grad():
        z = {k: (head.embed(v[0]), v[1]) for k, v in data.items()}
    ev = {s: (torch.cat([z[f"{s}_known"][0], z[f"{s}_unknown"][0]]), torch.cat([z[f"{s}_known"][1], z[f"{s}_unknown"][1]]))
          for s in ("val", "test")}
    raw = {m: {s: torch.cat([d[f"{s}_known"][0], d[f"{s}_unknown"][0]]) for s in ("val", "test")} for m, d in
           (("dnc", data), ("linear", lin))}
    pool_z, pool_y = z["pool"]
    p_old = head.centroids.centroids.detach().float()
    before = {s: accuracy(nearest(p_old, z[f"{s}_known"][0]), z[f"{s}_known"][1])["old"] for s in ("val", "test")}
    for n in shots:
        for d in range(draws):
            rng = np.random.default_rng(1000 * seed + d)
            pick = torch.as_tensor(np.concatenate([rng.choice(np.flatnonzero(pool_y.numpy() == NUM_OLD + j), n, replace=False)
                                                   for j in range(NUM_NEW)]))
            zs, ys = pool_z[pick], pool_y[pick]
            row = {"seed": seed, "draw": d, "shots": n, "old_before": before, "methods": {}}
            added = {classes_new: zs[ys == NUM_OLD + j] for j, classes_new in enumerate(["cat", "frog", "horse", "ship"])}
            _, model2, _ = extend_model(cfg, model, classes, added, [], cfg.train.seed)
            p_ext = model2.head.centroids.centroids.detach().float()
            row["methods"]["extend"] = {s: accuracy(nearest(p_ext, ev[s][0]), ev[s][1]) for s in ev}
            # extend+: the new classes as one mean each (K copies), and a short refinement on frozen embeddings
            zb, yb = z["bank"]
            new_means = F.normalize(torch.stack([zs[ys == c].mean(0) for c in range(NUM_OLD, NUM_OLD + NUM_NEW)]), dim=-1)
            p_mean = torch.cat([p_old, new_means[:, None].expand(-1, p_old.shape[1], -1)])
            row["methods"]["extend mean-new"] = {s: accuracy(nearest(p_mean, ev[s][0]), ev[s][1]) for s in ev}
            memory = torch.cat([torch.nonzero(yb == c).flatten()[:MEMORY_PER_CLASS] for c in range(NUM_OLD)])
            for start_name, start in (("extend", p_ext), ("extend mean-new", p_mean)):
                for steps, lr in REFINE:
                    p_ref = refine_subcentroids(start, torch.cat([zb[memory], zs]), torch.cat([yb[memory], ys]),
                                                head.temperature, steps, lr)
                    row["methods"][f"{start_name} refine @steps={steps},lr={lr}"] = {
                        s: accuracy(nearest(p_ref, ev[s][0]), ev[s][1]) for s in ev}
            # nearest class mean on the same embedding
            means = F.normalize(torch.stack([zb[yb == c].mean(0) for c in range(NUM_OLD)]
                                            + [zs[ys == c].mean(0) for c in range(NUM_OLD, NUM_OLD + NUM_NEW)]), dim=-1)
            row["methods"]["ncm"] = {s: accuracy(nearest(means[:, None], ev[s][0]), ev[s][1]) for s in ev}
            for m, d_ in (("dnc", data), ("linear", lin)):
                fb, fyb = d_["bank"]
                fs = d_["pool"][0][pick]
                if m == "linear":
                    ub, us = F.normalize(fb, dim=-1), F.normalize(fs, dim=-1)
                    lm = F.normalize(torch.stack([ub[fyb == c].mean(0) for c in range(NUM_OLD)]
                                                 + [us[ys == c].mean(0) for c in range(NUM_OLD, NUM_OLD + NUM_NEW)]), dim=-1)
                    row["methods"]["linear ncm"] = {s: accuracy(nearest(lm[:, None], F.normalize(raw[m][s], dim=-1)), ev[s][1])
                                                    for s in ev}
                for c in LOGREG_C:
                    pv, pt = logreg(torch.cat([fb, fs]), torch.cat([fyb, ys]), [raw[m]["val"], raw[m]["test"]], c)
                    name = ("logreg" if m == "dnc" else "linear logreg") + f" @C={c}"
                    row["methods"][name] = {"val": accuracy(pv, ev["val"][1]), "test": accuracy(pt, ev["test"][1])}
            rows.append(row)
            print(json.dumps({"seed": seed, "draw": d, "shots": n, **{k: v["test"] for k, v in row["methods"].items()}}),
                  flush=True)
    return rows


def summarise(rows: list) -> dict:
    out = {}
    for n in sorted({r["shots"] for r in rows}):
        mine = [r for r in rows if r["shots"] == n]
        table = {}
        for name in mine[0]["methods"]:
            table[name] = {f"{s}_{k}": round(statistics.mean(r["methods"][name][s][k] for r in mine), 2)
                           for s in ("val", "test") for k in ("old", "new", "all", "old_to_new")}
            table[name]["test_all_sd"] = round(statistics.stdev(r["methods"][name]["test"]["all"] for r in mine), 2) \
                if len(mine) > 1 else 0.0
        # a family with settings (e.g. "logreg @C=..."): the setting best on validation
        fams = {}
        for name in table:
            fam = name.split(" @")[0]
            if fam not in fams or table[name]["val_all"] > table[fams[fam]]["val_all"]:
                fams[fam] = name
        out[str(n)] = {"old_before": {s: round(statistics.mean(r["old_before"][s] for r in mine), 2) for s in ("val", "test")},
                       "methods": table, "chosen_on_val": fams}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5, 20, 100])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for s in args.seeds:
        rows += run_seed({m: args.work_dir / f"{m}_seed{s}" for m in ("dnc", "linear")}, args.shots, args.draws, s)
    summary = summarise(rows)
    for n, s in summary.items():
        print(f"\n{n} shots (old classes before adding: test {s['old_before']['test']:.2f})")
        print("| method | val all | test old | test new | test all | old -> new |")
        print("| --- | --- | --- | --- | --- | --- |")
        for fam, name in s["chosen_on_val"].items():
            r = s["methods"][name]
            print(f"| {name} | {r['val_all']:.2f} | {r['test_old']:.2f} | {r['test_new']:.2f} | {r['test_all']:.2f} ± "
                  f"{r['test_all_sd']:.2f} | {r['test_old_to_new']:.2f} |")
    full = {"seeds": args.seeds, "draws": args.draws, "summary": summary, "rows": rows}
    if args.out:
        write_json(args.out, full)
    return full


if __name__ == "__main__":
    main()
