#!/usr/bin/env python
"""Top-1 of the embedded MNIST ViT quantized with each calibration method, on the 10k test images.

    python benchmarks/dfq_accuracy.py                                  # everything (hours on 2 CPU cores)
    python benchmarks/dfq_accuracy.py --recipes w4a4,w3a3 --methods noise,psaq,maskaq-fast --seeds 0
    python benchmarks/dfq_accuracy.py --ablation --recipes w4a4 --seeds 0,1,2
    python benchmarks/dfq_accuracy.py --table                          # print what is saved so far
    python benchmarks/dfq_accuracy.py --quick                          # tiny settings: checks the script

Methods (columns): noise, psaq and maskaq-fast use the ``fast`` preset (256 images, calibration only);
maskaq-std uses ``standard`` (fine-tuning with refresh); real / real-std calibrate (and fine-tune) on real
training images from ``mnist_calib.npz`` with the fast / standard preset. ``--ablation`` adds maskaq-fast with
one synthesis loss term (CE, inter-head SSIM, TV, mask alignment, entropy) switched off, and maskaq-std
without the refresh. PSAQ-ViT images do not involve Q, so each seed's are synthesized once and shared by the
recipes.
Every finished (recipe, method, seed) is saved at once into the JSON (``--out``). Several processes may
share it (start the same command twice to use two cores): each claims the next job nobody runs; a rerun
skips what is there and resumes an interrupted run from its checkpoint in ``--workdir``.
Cells are mean +- std over seeds of top-1 (%) and the mean calibration wall time; a second table gives the
mean process CPU time, which does not depend on how busy the machine was (at 1 thread, the idle wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("MASKAQ_EMBEDDED_DIR", ROOT / "maskaq_deploy" / "assets" / "embedded"))
RECIPES = ("w8a8", "w4a8", "w4a4", "w3a3")
METHODS = {  # name: (calibration method, preset, config overrides)
    "noise": ("noise", "fast", {}),
    "psaq": ("psaq", "fast", {}),
    "maskaq-fast": ("maskaq", "fast", {}),
    "maskaq-std": ("maskaq", "standard", {}),
    "real": ("real", "fast", {}),
    "real-std": ("real", "standard", {}),
}
# A synthesis loss term is ablated on maskaq-fast (the images are all that term changes, and calibration-only
# runs cost half a standard run); the refresh is ablated on maskaq-std, the preset that refreshes.
ABLATIONS = {
    "no-ce": ("maskaq", "fast", {"w_ce": 0.0}),
    "no-interhead": ("maskaq", "fast", {"w_interhead": 0.0}),
    "no-tv": ("maskaq", "fast", {"w_tv": 0.0}),
    "no-mask": ("maskaq", "fast", {"w_mask": 0.0}),
    "no-entropy": ("maskaq", "fast", {"w_entropy": 0.0}),
    "no-refresh": ("maskaq", "standard", {"refresh_every": 0}),
}
QUICK = {"num_images": 64, "iterations": 30, "batch_size": 32}


def load_embedded(device):
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((ASSETS / "config.json").read_text())
    model = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["model_kwargs"])
    model.load_state_dict(load_file(str(ASSETS / "model.safetensors")))
    model.to(device).eval()
    data = {"mean": cfg["mean"], "std": cfg["std"], "input_size": cfg["input_size"]}
    return model, data, cfg


def load_npz(name: str, data: dict):
    z = np.load(ASSETS / name)
    x = torch.from_numpy(z["images"]).float().div(255.0).unsqueeze(1)
    mean = torch.tensor(data["mean"]).reshape(1, -1, 1, 1)
    std = torch.tensor(data["std"]).reshape(1, -1, 1, 1)
    return (x - mean) / std, torch.from_numpy(z["labels"]).long()


@torch.no_grad()
def top1(model, images, labels, device, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        correct += (model(images[i:i + batch].to(device)).argmax(1).cpu() == labels[i:i + batch]).sum().item()
    return 100.0 * correct / len(images)


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def save_result(path: Path, key: str, value: dict, meta: dict) -> None:
    from maskaq_deploy.calib.checkpoint import atomic_write_json

    with locked(path):
        res = read_results(path)
        res.setdefault("meta", {}).update(meta)
        res["runs"][key] = value
        res.get("claims", {}).pop(key, None)
        atomic_write_json(path, res)


PSAQ_REUSED = {"batches": 0}


def share_psaq_images(cache_dir: Path) -> None:
    """PSAQ-ViT synthesis does not involve Q, so its images depend on the seed but not on the recipe: keep each
    synthesized batch on disk, keyed by its seed, and reuse it for the other recipes (the same images that a
    fresh synthesis would make, at a quarter of the cost over four recipes)."""
    import maskaq_deploy.calib.dfq.rounds as rounds
    from safetensors import safe_open
    from safetensors.torch import save_file

    from maskaq_deploy.calib.checkpoint import atomic_path

    synthesize = rounds.synthesize_batch

    def cached(setup, labels, seed, on_log=None):
        if setup.method != "psaq":
            return synthesize(setup, labels, seed, on_log)
        path = cache_dir / f"{seed}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if torch.equal(f.get_tensor("labels"), labels):
                    PSAQ_REUSED["batches"] += 1
                    return f.get_tensor("images"), json.loads(f.metadata()["final"]), []
        x, last, curve = synthesize(setup, labels, seed, on_log)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"images": x.contiguous(), "labels": labels.contiguous()}, str(tmp),
                      metadata={"final": json.dumps(last)})
        return x, last, curve

    rounds.synthesize_batch = cached


def claim(path: Path, key: str) -> bool:
    """Claim ``key`` for this process unless it is done or a live process holds it."""
    with locked(path):
        res = read_results(path)
        if key in res.get("runs", {}):
            return False
        owner = res.get("claims", {}).get(key)
        if owner and owner != os.getpid():
            try:
                os.kill(owner, 0)
                return False
            except ProcessLookupError:
                pass
        res.setdefault("claims", {})[key] = os.getpid()
        from maskaq_deploy.calib.checkpoint import atomic_write_json

        atomic_write_json(path, res)
        return True


def run_one(name: str, spec, recipe: str, seed: int, args, fp, data, test, real, device) -> dict:
    from maskaq_deploy.calib import RECIPES as ALL_RECIPES
    from maskaq_deploy.calib import attach_quantizers
    from maskaq_deploy.calib.dfq import DFQConfig, run_calibration

    method, preset, overrides = spec
    overrides = {**overrides, **(QUICK if args.quick else {})}
    if args.quick and preset == "standard":
        overrides.update(epochs=2, refresh_every=0 if overrides.get("refresh_every") == 0 else 1)
    config = DFQConfig.from_preset(preset, seed=seed, **overrides)
    q = copy.deepcopy(fp)
    attach_quantizers(q, ALL_RECIPES[recipe])
    run_dir = Path(args.workdir) / ("quick" if args.quick else "full") / recipe / name / f"seed{seed}"
    last = {"t": 0.0}

    def progress(event):
        if not args.verbose or time.monotonic() - last["t"] < 30:
            return
        last["t"] = time.monotonic()
        losses = " ".join(f"{k} {v:.3g}" for k, v in event.get("losses", {}).items())
        print(f"    {event['stage']} {event['step']}/{event['total']} {losses}", flush=True)

    cpu0, reused0 = time.process_time(), PSAQ_REUSED["batches"]
    summary = run_calibration(fp, q, method=method, config=config, data_config=data, run_dir=run_dir,
                              real_images=real[0], real_labels=real[1], resume=True, device=device,
                              progress=progress)
    cpu_seconds = time.process_time() - cpu0
    acc = top1(q, test[0], test[1], device)
    return {"recipe": recipe, "method": name, "seed": seed, "top1": acc,
            "seconds": summary["seconds"]["total"], "cpu_seconds": cpu_seconds,
            "stage_seconds": summary["seconds"], "reused_images": PSAQ_REUSED["batches"] > reused0,
            "resumed": summary["resumed"], "final_losses": summary["final_losses"],
            "curves": summary["curves"], "config": summary["config"]}


def fmt_cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    accs = [r["top1"] for r in rows]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    # time only runs that did all their work: not one that reused another recipe's psaq images, nor one that
    # resumed an interrupted run (its clock started at the resume)
    timed = [r for r in rows if not r.get("reused_images") and not r.get("resumed")]
    secs = f"{statistics.mean(r['seconds'] for r in timed):.0f} s" if timed else (
        "resumed" if any(r.get("resumed") for r in rows) else "shared images")
    n = f" n={len(rows)}" if len(rows) < 3 else ""
    return f"{statistics.mean(accs):.2f} ± {sd:.2f} ({secs}{n})"


def print_tables(res: dict) -> None:
    runs = list(res.get("runs", {}).values())
    meta = res.get("meta", {})
    print(f"\nEmbedded MNIST ViT, top-1 (%) on {meta.get('test_images', '?')} test images, mean ± std over "
          f"seeds (calibration wall time, {meta.get('threads', '?')} thread(s)); FP {meta.get('fp_top1', '?')}")

    def table(cols, title, seeds=None, recipes=None):
        rows = [r for r in runs if (seeds is None or r["seed"] in seeds)
                and (recipes is None or r["recipe"] in recipes)]
        present = [c for c in cols if any(r["method"] == c for r in rows)]
        if not present:
            return
        print(f"\n{title}\n")
        print("| recipe | " + " | ".join(present) + " |")
        print("|---|" + "---|" * len(present))
        for recipe in RECIPES:
            cells = [fmt_cell([r for r in rows if r["recipe"] == recipe and r["method"] == c]) for c in present]
            if any(c != "-" for c in cells):
                print(f"| {recipe} | " + " | ".join(cells) + " |")

    table(list(METHODS), "Methods")
    abl_seeds = {r["seed"] for r in runs if r["method"] in ABLATIONS}
    table(["maskaq-fast", *list(ABLATIONS)[:-1], "maskaq-std", "no-refresh"],
          f"Ablation (seeds {sorted(abl_seeds)}): one synthesis loss term switched off (against maskaq-fast), "
          "the refresh switched off (against maskaq-std)", abl_seeds,
          {r["recipe"] for r in runs if r["method"] in ABLATIONS})
    cpu = {}
    for r in runs:
        if "cpu_seconds" in r and not r.get("reused_images") and not r.get("resumed"):
            cpu.setdefault(r["method"], []).append(r["cpu_seconds"])
    if cpu:
        print("\nMean CPU seconds per calibration (all recipes and seeds)\n")
        print("| " + " | ".join(cpu) + " |")
        print("|" + "---|" * len(cpu))
        print("| " + " | ".join(f"{statistics.mean(v):.0f}" for v in cpu.values()) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ablation", action="store_true", help="also run the ablation (w4a4 and w3a3 by default)")
    ap.add_argument("--ablation-recipes", default="w4a4,w3a3")
    ap.add_argument("--ablation-seeds", default="0")
    ap.add_argument("--quick", action="store_true", help="tiny settings and 2000 test images (checks the script)")
    ap.add_argument("--out", default=None, help="results JSON (default runs/dfq_accuracy[_quick].json)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "dfq_accuracy"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--table", action="store_true", help="only print the saved results")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    out = Path(args.out or ROOT / "runs" / f"dfq_accuracy{'_quick' if args.quick else ''}.json")
    if args.table:
        print_tables(read_results(out))
        return
    if not (ASSETS / "model.safetensors").is_file():
        sys.exit(f"the embedded model is missing: {ASSETS}/model.safetensors")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    share_psaq_images(Path(args.workdir) / ("quick" if args.quick else "full") / "psaq_images")
    fp, data, _cfg = load_embedded(device)
    test = load_npz("mnist_test.npz", data)
    if args.quick:
        test = (test[0][:2000], test[1][:2000])
    real = load_npz("mnist_calib.npz", data)
    fp_acc = top1(fp, test[0], test[1], device)
    meta = {"fp_top1": round(fp_acc, 2), "test_images": len(test[0]), "threads": args.threads,
            "device": args.device, "torch": torch.__version__, "quick": args.quick}
    print(f"FP top-1 {fp_acc:.2f} % on {len(test[0])} test images", flush=True)

    # Seed by seed, so that a partial run already has every cell; the ablation after the first seed.
    for name in args.methods.split(","):
        if name not in METHODS:
            sys.exit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    abl_seeds = [int(s) for s in args.ablation_seeds.split(",")] if args.ablation else []
    jobs = []
    for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
        jobs += [(recipe, name, METHODS[name], seed) for recipe in args.recipes.split(",")
                 for name in args.methods.split(",")]
        if i == 0:
            jobs += [(recipe, name, spec, s) for s in abl_seeds for recipe in args.ablation_recipes.split(",")
                     for name, spec in ABLATIONS.items()]
    for recipe, name, spec, seed in jobs:
        key = f"{recipe}/{name}/seed{seed}"
        if not claim(out, key):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
        result = run_one(name, spec, recipe, seed, args, fp, data, test, real, device)
        save_result(out, key, result, meta)
        print(f"[{time.strftime('%H:%M:%S')}] {key}: top-1 {result['top1']:.2f} in {result['seconds']:.0f} s",
              flush=True)
    print_tables(read_results(out))


if __name__ == "__main__":
    main()
