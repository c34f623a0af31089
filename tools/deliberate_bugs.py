"""Deliberate bugs (TESTING.md): apply each alone to the source, run the tests that should catch it, revert.

    python tools/deliberate_bugs.py all        # or names of BUGS
Prints CAUGHT or MISSED per bug. Edits the working tree while a bug runs: do not run it beside other work.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C, H, EM = "src/dnc/centroids.py", "src/dnc/heads.py", "src/dnc/embedding.py"
KM = "tests/test_kmeans_init.py"
BUGS = {
 "seed-uniform": (C, "centers.append(pick(step, dist2))", "centers.append(pick(step, valid.to(pts.dtype)))", [KM]),
 "seed-D": (C, "centers.append(pick(step, dist2))", "centers.append(pick(step, dist2.sqrt()))", [KM]),
 "seed-D4": (C, "centers.append(pick(step, dist2))", "centers.append(pick(step, dist2 ** 2))", [KM]),
 "seed-first-fixed": (C, "centers = [pick(0, valid.to(pts.dtype))]", "centers = [pts[:, 0]]", [KM]),
 "stale-dist-replace": (C, "dist2 = torch.minimum(dist2, (1 - torch.einsum(\"gnd,gd->gn\", pts, centers[-1])).clamp_min(0))",
                        "dist2 = (1 - torch.einsum(\"gnd,gd->gn\", pts, centers[-1])).clamp_min(0)", [KM]),
 "stale-dist-never": (C, "dist2 = torch.minimum(dist2, (1 - torch.einsum(\"gnd,gd->gn\", pts, centers[-1])).clamp_min(0))",
                      "pass", [KM]),
 "assign-argmin": (C, "assign = torch.einsum(\"gnd,gkd->gnk\", pts, centers).argmax(-1)",
                   "assign = torch.einsum(\"gnd,gkd->gnk\", pts, centers).argmin(-1)", [KM]),
 "assign-padding-counted": (C, "onehot = F.one_hot(assign, k).to(pts.dtype) * valid[..., None]",
                            "onehot = F.one_hot(assign, k).to(pts.dtype)", [KM]),
 "lloyd-keeps-old": (C, "centers = torch.where(onehot.sum(1)[..., None] > 0, F.normalize(sums, dim=-1), centers)",
                     "centers = torch.where(onehot.sum(1)[..., None] > 0, centers, F.normalize(sums, dim=-1))", [KM]),
 "lloyd-skipped": (C, "    for _ in range(iters):\n        assign", "    for _ in range(0):\n        assign", [KM]),
 "labels-shifted": (C, "groups = torch.where((labels >= 0) & (labels < c), labels, c)\n            centers, found",
                    "groups = torch.where((labels >= 0) & (labels < c), (labels + 1) % c, c)\n            centers, found", [KM]),
 "centers-shifted": (C, "new = torch.where(found, centers[:c].to(self.centroids), self.centroids)",
                     "new = torch.where(found, centers[1:c + 1].to(self.centroids), self.centroids)", [KM]),
 "init-noop": (C, "                dist.broadcast(new, 0)\n            self.centroids = new", "                dist.broadcast(new, 0)\n", [KM]),
 "init-no-normalize": (C, "kmeans_pp(F.normalize(z.float(), dim=-1), groups", "kmeans_pp(z.float(), groups", [KM]),
 "bn-train-mode": (EM, "    net.eval()\n    try:", "    net.train()\n    try:", [KM]),
 "sims-autocast": (C, "        if torch.is_autocast_enabled(z.device.type):  # not while exporting", "        if False:  # not while exporting", ["tests/test_precision.py"]),
 "lowprec-sims-used": (C, "if sims is None or sims.dtype not in (torch.float32, torch.float64):", "if sims is None:", ["tests/test_precision.py"]),
 "update-guard-removed": (C, "        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):\n            return self._update(z, labels, correct, sims)",
                          "        with torch.no_grad():\n            return self._update(z, labels, correct, sims)", ["tests/test_precision.py"]),
 "ddp-init-local-only": (C, "            if _world_size() > 1:\n                z, labels = _gather_rows(z.float(), labels.long())\n", "", ["tests/test_ddp_init.py"]),
}
E = "src/dnc/extend.py"
EX = ["tests/test_extend.py", "-k", "several or remove_drops or layernorm_calibration"]
BUGS.update({
 "extend-groups-reversed": (E, "for i, n in enumerate(added)]).to(z.device)", "for i, n in enumerate(reversed(list(added)))]).to(z.device)", EX),
 "extend-kept-prefix": (E, "centroids = torch.cat([p_old[keep], p_new.to(p_old)])", "centroids = torch.cat([p_old[: len(keep)], p_new.to(p_old)])", EX),
 "extend-calib-prefix": (E, "            kept = before[index.to(before.device)]\n", "            kept = before[: len(index)]\n", EX),
 "extend-calib-mean-all": (E, "extra = before[index.to(before.device)].float().mean(0, keepdim=True)", "extra = before.float().mean(0, keepdim=True)", EX),
 "extend-new-groups-offset": (E, "p_new = fit_subcentroids(z, groups, len(added), k,", "p_new = fit_subcentroids(z, (groups + 1) % len(added), len(added), k,", EX),
})

PH = ["tests/test_heads.py", "-k", "pixel_head_inference"]
BUGS.update({
 "pixel-ignore-256": (H, "def __init__(self, head: nn.Module, ignore_index: int = 255):", "def __init__(self, head: nn.Module, ignore_index: int = 256):", PH),
 "pixel-ignore-kept": (H, "self.head(flat, torch.where(t == self.ignore_index, -1, t))", "self.head(flat, t)", PH),
 "pixel-unflatten-permute": (H, "return logits.view(b, h, w, -1).permute(0, 3, 1, 2)", "return logits.view(b, -1, h, w)", PH),
})

def run(name):
    f, old, new, tests = BUGS[name]
    path = ROOT / f
    src = path.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    path.write_text(src.replace(old, new))
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
        r = subprocess.run(["timeout", "900", "nice", "-n", "19", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        failed = [l for l in r.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'} {failed[:2]}", flush=True)
    finally:
        path.write_text(src)

names = sys.argv[1:] if sys.argv[1:] != ["all"] else list(BUGS)
for n in names:
    run(n)
