#!/usr/bin/env python
"""Top-1 of the embedded MNIST ViT and the benchmark zoo quantized with each calibration method.

    python benchmarks/dfq_accuracy.py                                  # everything (many hours on 2 CPU cores)
    python benchmarks/dfq_accuracy.py --models embedded --recipes w4a4,w3a3 --methods psaq,maskaq-fast --seeds 0
    python benchmarks/dfq_accuracy.py --models deit_s2,vit_gap,swin --recipes w4a4 --seeds 0
    python benchmarks/dfq_accuracy.py --ablation --recipes w4a4 --seeds 0,1,2
    python benchmarks/dfq_accuracy.py --table                          # print what is saved so far
    python benchmarks/dfq_accuracy.py --quick                          # tiny settings: checks the script
    python benchmarks/dfq_accuracy.py --models deit_tiny_patch16_224 --methods noise,real --seeds 0 --threads 2 \\
        --limit 1000 --out benchmarks/results/dfq_accuracy_224.json    # 224 px: its own file, fewer images
    python benchmarks/dfq_accuracy.py --split valid --mnist mnist/data/mnist.pkl.gz ...   # choose settings

Models (rows): ``embedded`` (the shipped 6-layer ViT, 49 patches + CLS) and every ``benchmarks/zoo/<name>``
trained by ``scripts/train_zoo.py`` (``deit_s2``: 196 patches + CLS, 8 layers; ``vit_gap``: no class token,
average pooling; ``swin``: shifted windows, patch merging; ``deit_tiny_patch16_224``: DeiT-Tiny at 224 px on MNIST
upscaled as ``scripts/train_zoo.py`` feeds it, run by name only). Top-1 is on the 10k MNIST test images (the
embedded ``mnist_test.npz``), or with ``--split valid`` on the 10k valid split of the MNIST pickle (that is
where settings are chosen; the test split only reports).

Methods (columns): noise, psaq and maskaq-fast use the ``fast`` preset (256 images); ``maskaq-fast`` is the
preset as it is now (synthesis, calibration, block-wise reconstruction), ``maskaq-calib`` the same images with
calibration only (the method before reconstruction); ``real`` calibrates on 256 real training images from
``mnist_calib.npz`` with no training stage (the reference), ``real-recon`` adds the same reconstruction.
(``standard`` has ``fast``'s values, so it has no column.) ``--ablation`` adds maskaq-fast variants (a synthesis
loss term off, reconstruction settings, the guarded fine-tune that ``standard`` used to add, with and without
its guard).
Synthesized batches that do not depend on what follows them (PSAQ; MaskAQ's first round, whose Q is the same
noise-calibrated model for every preset) are kept on disk keyed by everything they depend on and reused, so
maskaq-fast and maskaq-calib share their images.
Every finished (model, recipe, method, seed) is saved at once into the JSON (``--out``), with the cells (mean and
std over seeds) recomputed from the runs; ``--out benchmarks/results/dfq_accuracy.json`` replaces the committed
cells that docs/results.md is made from (``python scripts/render_docs.py`` then rewrites it). Several processes may
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
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import result_tables
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("MASKAQ_EMBEDDED_DIR", ROOT / "maskaq_deploy" / "assets" / "embedded"))
ZOO = ROOT / "benchmarks" / "zoo"
RECIPES = ("w8a8", "w4a8", "w4a4", "w3a3")
NO_RECON = {"recon_iters": 0}
METHODS = {  # name: (calibration method, preset, config overrides as [dfq] keys)
    "noise": ("noise", "fast", {}),
    # the published baseline: the paper's image prior weight, 100 steps at every recipe (fast's w8a8 50 are
    # MaskAQ's choice for the build's budget; its cells were measured with 100)
    "psaq": ("psaq", "fast", {"w_tv": 2.5e-5, "iterations_8bit": 0}),
    "maskaq-calib": ("maskaq", "fast", NO_RECON),
    "maskaq-fast": ("maskaq", "fast", {}),
    "real": ("real", "fast", NO_RECON),
    "real-recon": ("real", "fast", {"recon_real": True}),
}
DEFAULT_METHODS = ("noise", "psaq", "maskaq-calib", "maskaq-fast", "real", "real-recon")
# the fine-tune ``standard`` added until it was found not to pay: up to 4 epochs at lr 1e-4, guarded by a quarter
# of the set held out (its KL of Q from P judges each epoch, the best is kept), stop after 2 without improvement
GUARDED_FT = {"epochs": 4, "ft_batch_size": 32, "ft_lr": 1e-4, "ft_holdout": 0.25, "ft_patience": 2}
# A synthesis loss term is ablated on maskaq-calib (the images are all that term changes); the reconstruction's
# settings (steps, what it trains, QDrop mixing, CutMix-extended sets, more images) on maskaq-fast; the guard on
# fast-guarded-ft. The reconstruction variants measured before the focused loss keep it off (UNFOCUSED), so that a
# rerun measures what docs/maskaq.md reports for them.
UNFOCUSED = {"recon_focus": 0.0}
ABLATIONS = {
    "no-ce": ("maskaq", "fast", {"w_ce": 0.0, **NO_RECON}),
    "no-interhead": ("maskaq", "fast", {"w_interhead": 0.0, **NO_RECON}),
    "no-tv": ("maskaq", "fast", {"w_tv": 0.0, **NO_RECON}),
    "no-mask": ("maskaq", "fast", {"w_mask": 0.0, **NO_RECON}),
    "no-entropy": ("maskaq", "fast", {"w_entropy": 0.0, **NO_RECON}),
    "recon-scales-only": ("maskaq", "fast", {"recon_weight_lr": 0.0, **UNFOCUSED}),
    "recon-no-drop": ("maskaq", "fast", {"recon_drop": 0.0, **UNFOCUSED}),
    "recon-100": ("maskaq", "fast", {"recon_iters": 100, **UNFOCUSED}),
    "recon-200": ("maskaq", "fast", {"recon_iters": 200, **UNFOCUSED}),
    "recon-300": ("maskaq", "fast", {"recon_iters": 300, **UNFOCUSED}),  # fast before 200 steps and the focus
    "recon-600": ("maskaq", "fast", {"recon_iters": 600, **UNFOCUSED}),
    "recon-wlr-1e-3": ("maskaq", "fast", {"recon_weight_lr": 1e-3, **UNFOCUSED}),
    "recon-100-cutmix-1": ("maskaq", "fast", {"recon_iters": 100, "recon_cutmix": 1.0, **UNFOCUSED}),
    "recon-100-cutmix-3": ("maskaq", "fast", {"recon_iters": 100, "recon_cutmix": 3.0, **UNFOCUSED}),
    "recon-cutmix-3": ("maskaq", "fast", {"recon_cutmix": 3.0, **UNFOCUSED}),
    "recon-600-cutmix-1": ("maskaq", "fast", {"recon_iters": 600, "recon_cutmix": 1.0, **UNFOCUSED}),
    "fast-512": ("maskaq", "fast", {"num_images": 512, **UNFOCUSED}),
    # the unit loss weighted toward the tokens P's readout depends on (attention rollout); 0: fast before it
    "recon-focus-0": ("maskaq", "fast", UNFOCUSED),
    "recon-focus-0.5": ("maskaq", "fast", {"recon_focus": 0.5}),
    "recon-focus-0.8": ("maskaq", "fast", {"recon_focus": 0.8}),
    "fast-guarded-ft": ("maskaq", "fast", GUARDED_FT),  # the earlier standard
    "std-unguarded": ("maskaq", "fast", {**GUARDED_FT, "ft_holdout": 0.0, "ft_patience": 0}),
    "calib-tv-paper": ("maskaq", "fast", {"w_tv": 2.5e-5, **NO_RECON}),  # the image prior's weight before
    "fast-tv-paper": ("maskaq", "fast", {"w_tv": 2.5e-5, **UNFOCUSED}),
    "calib-tv-1.6e-2": ("maskaq", "fast", {"w_tv": 1.6e-2, **NO_RECON}),
    # w8a8 with the short presets' low-bit TV weight (their w8a8 before it got the paper's)
    "calib-8bit-tv-4e-3": ("maskaq", "fast", {"w_tv_8bit": 4e-3, **NO_RECON}),
    "fast-8bit-tv-4e-3": ("maskaq", "fast", {"w_tv_8bit": 4e-3, **UNFOCUSED}),
    # w8a8 synthesis steps per batch: fast's 50 (chosen for the default build's time budget) and 100 before it
    "fast-8bit-iter-50": ("maskaq", "fast", {"iterations_8bit": 50}),
    "fast-8bit-iter-100": ("maskaq", "fast", {"iterations_8bit": 100}),
    # soft labels: up to this share of each image's CE target on a second class
    "calib-soft-0.3": ("maskaq", "fast", {"soft_label_mix": 0.3, **NO_RECON}),
    "fast-soft-0.3": ("maskaq", "fast", {"soft_label_mix": 0.3, **UNFOCUSED}),
}
# the columns of the ablation table: the synthesis terms against maskaq-calib, the reconstruction settings
# against maskaq-fast, the guarded fine-tune and its guard against maskaq-fast
ABLATION_COLUMNS = ("calib-tv-paper", "calib-tv-1.6e-2", "calib-soft-0.3", "maskaq-calib", "no-ce", "no-interhead",
                    "no-tv", "no-mask", "no-entropy", "recon-100", "recon-200", "recon-300", "fast-tv-paper",
                    "calib-8bit-tv-4e-3", "fast-8bit-tv-4e-3", "fast-8bit-iter-100", "fast-8bit-iter-50",
                    "fast-soft-0.3", "maskaq-fast", "recon-600",
                    "recon-scales-only", "recon-no-drop", "recon-wlr-1e-3", "recon-100-cutmix-1",
                    "recon-100-cutmix-3", "recon-cutmix-3", "recon-600-cutmix-1", "fast-512", "recon-focus-0",
                    "recon-focus-0.5", "recon-focus-0.8", "fast-guarded-ft", "std-unguarded")
QUICK = {"num_images": 64, "iterations": 30, "batch_size": 32}


def model_names(small_only: bool = False) -> list[str]:
    """The models there are; ``small_only``: the 28-px ones (the default run: the 224-px model costs hours more)."""
    names = sorted(p.parent.name for p in ZOO.glob("*/config.json"))
    if small_only:
        names = [n for n in names if json.loads((ZOO / n / "config.json").read_text())["input_size"][1:] == [28, 28]]
    return ["embedded"] + names


def load_model(name: str, device):
    import timm
    from safetensors.torch import load_file

    where = ASSETS if name == "embedded" else ZOO / name
    if not (where / "config.json").is_file():
        sys.exit(f"unknown model {name!r}: no {where}/config.json; choose from {', '.join(model_names())}")
    cfg = json.loads((where / "config.json").read_text())
    model = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["model_kwargs"])
    model.load_state_dict(load_file(str(where / "model.safetensors")))
    model.to(device).eval()
    data = {"mean": cfg["mean"], "std": cfg["std"], "input_size": cfg["input_size"]}
    return model, data, cfg


class Upscaled:
    """28-px MNIST for a model that takes larger images (the 224-px zoo model), upscaled and normalized a batch
    at a time as scripts/train_zoo.py feeds it: 10k 224-px images as floats would be 6 GB."""

    def __init__(self, images: np.ndarray, data: dict):
        self.images, self.data = images, data

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> Upscaled:
        return Upscaled(self.images[index], self.data)

    def tensor(self) -> torch.Tensor:
        sys.path.insert(0, str(ROOT / "scripts"))
        import train_zoo

        x = train_zoo.to_input(torch.from_numpy(self.images), self.data["input_size"]).float().div(255.0)
        return _standardize(x, self.data)


def _standardize(x: torch.Tensor, data: dict) -> torch.Tensor:
    mean = torch.tensor(data["mean"]).reshape(1, -1, 1, 1)
    std = torch.tensor(data["std"]).reshape(1, -1, 1, 1)
    return (x - mean) / std


def normalized(images: np.ndarray, labels: np.ndarray, data: dict):
    if tuple(data["input_size"]) != (1, *images.shape[1:]):
        return Upscaled(images, data), torch.from_numpy(labels).long()
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    return _standardize(x, data), torch.from_numpy(labels).long()


def load_npz(name: str, data: dict):
    z = np.load(ASSETS / name)
    return normalized(z["images"], z["labels"], data)


def load_valid(mnist_path: str, data: dict):
    """The 10k valid split of the MNIST pickle, through scripts/train_embedded.py's loader."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_embedded

    images, labels = train_embedded.load_mnist(mnist_path)["valid"]
    return normalized(images, labels, data)


@torch.no_grad()
def top1(model, images, labels, device, batch: int = 1000) -> float:
    correct = 0
    if isinstance(images, Upscaled):
        batch = 100  # 224-px activations
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        x = x.tensor() if isinstance(x, Upscaled) else x
        correct += (model(x.to(device)).argmax(1).cpu() == labels[i:i + batch]).sum().item()
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
        old = res.setdefault("meta", {})
        fp = {**(old.get("fp_top1") if isinstance(old.get("fp_top1"), dict) else {}), **meta.get("fp_top1", {})}
        old.update(meta)
        old["fp_top1"] = fp
        command = "python benchmarks/dfq_accuracy.py " + " ".join(sys.argv[1:])
        res["runs"][key] = {**value, "command": command}
        res.get("claims", {}).pop(key, None)
        result_tables.refresh_dfq(res, command)
        atomic_write_json(path, res)


REUSED = {"batches": 0, "seconds": 0.0, "cpu_seconds": 0.0}  # what reused batches cost when they were made
# the parts of the config a synthesized batch depends on (the other parts are read only by later stages), and the
# shared fields it does not depend on
SYNTHESIS_PARTS = ("synthesis", "maskaq", "psaq")
NOT_SYNTHESIS = {"preset", "log_every"}
# resolved into w_tv / iterations for the recipe before synthesis
EIGHT_BIT_VARIANTS = {"w_tv_8bit", "iterations_8bit"}


def _synthesis_key(setup, labels, seed) -> str:
    """Everything a synthesized batch depends on: method, synthesis settings, P, Q's state (MaskAQ), labels,
    seed. A refreshed round's Q differs from run to run, so it never matches another run's batch."""
    from maskaq_deploy.calib.dfq.config import PARTS

    h = hashlib.sha256()
    d = setup.cfg.to_dict()
    cfg = {k: v for k, v in d.items() if k not in PARTS and k not in NOT_SYNTHESIS}
    cfg.update({part: d[part] for part in SYNTHESIS_PARTS})
    cfg["synthesis"] = {k: v for k, v in d["synthesis"].items() if k not in EIGHT_BIT_VARIANTS}
    h.update(json.dumps([setup.method, cfg, seed, labels.tolist(), list(setup.input_size)]).encode())
    # P's float tensors only (its disabled quantizers hold the recipe's scales, which P never uses); all of Q
    for model, skip in ((setup.teacher, "_quantizer."), (setup.student, None)):
        if model is not None:
            for k, v in model.state_dict().items():
                if skip is None or skip not in k:
                    h.update(k.encode())
                    h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def share_synthesized_images(cache_dir: Path) -> None:
    """Keep each synthesized batch on disk under a key of everything it depends on, and reuse it: PSAQ's images
    (Q not involved) serve every recipe, MaskAQ's first round serves maskaq-calib and maskaq-fast (same Q, same
    synthesis settings) -- the images a fresh synthesis would make, at a fraction of the cost."""
    import maskaq_deploy.calib.dfq.rounds as rounds
    from safetensors import safe_open
    from safetensors.torch import save_file

    from maskaq_deploy.calib.checkpoint import atomic_path

    synthesize = rounds.synthesize_batch

    def cached(setup, labels, seed, on_log=None):
        path = cache_dir / f"{_synthesis_key(setup, labels, seed)}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                REUSED["batches"] += 1
                REUSED["seconds"] += float(meta["seconds"])
                REUSED["cpu_seconds"] += float(meta["cpu_seconds"])
                return f.get_tensor("images"), json.loads(meta["final"]), json.loads(meta["curve"])
        t0, cpu0 = time.perf_counter(), time.process_time()
        x, last, curve = synthesize(setup, labels, seed, on_log)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"images": x.contiguous(), "labels": labels.contiguous()}, str(tmp),
                      metadata={"final": json.dumps(last), "curve": json.dumps(curve),
                                "seconds": str(time.perf_counter() - t0),
                                "cpu_seconds": str(time.process_time() - cpu0)})
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


def column_config(spec, seed: int, quick: bool):
    """The DFQConfig of a column (before its source's stages and the recipe's 8-bit values resolve it)."""
    from maskaq_deploy.calib.dfq import DFQConfig

    _method, preset, overrides = spec
    overrides = {**overrides, **(QUICK if quick else {})}
    if quick and overrides.get("epochs"):
        overrides.update(epochs=2, refresh_every=0 if overrides.get("refresh_every") == 0 else 1)
    return DFQConfig.from_preset(preset, seed=seed, **overrides)


def run_one(model: str, name: str, spec, recipe: str, seed: int, args, fp, data, evalset, real, device) -> dict:
    from maskaq_deploy.calib import RECIPES as ALL_RECIPES
    from maskaq_deploy.calib import attach_quantizers
    from maskaq_deploy.calib.dfq import run_calibration
    from maskaq_deploy.calib.dfq.errors import ResumeError

    method = spec[0]
    config = column_config(spec, seed, args.quick)
    q = copy.deepcopy(fp)
    attach_quantizers(q, ALL_RECIPES[recipe])
    run_dir = Path(args.workdir) / ("quick" if args.quick else "full") / model / recipe / name / f"seed{seed}"
    last = {"t": 0.0}

    def progress(event):
        if not args.verbose or time.monotonic() - last["t"] < 30:
            return
        last["t"] = time.monotonic()
        losses = " ".join(f"{k} {v:.3g}" for k, v in event.get("losses", {}).items())
        print(f"    {event['stage']} {event['step']}/{event['total']} {losses}", flush=True)

    cpu0, reused0 = time.process_time(), dict(REUSED)

    def calibrate(resume: bool):
        # synthesis in this process (no worker processes at --threads > 1): the CPU time measured here and the
        # image cache (share_synthesized_images) see all of it
        return run_calibration(fp, q, method=method, config=config, data_config=data, run_dir=run_dir,
                               real_images=real[0], real_labels=real[1], resume=resume, device=device,
                               progress=progress, synthesis_workers=1)

    try:
        summary = calibrate(resume=True)
    except ResumeError:  # a checkpoint of this cell from before a settings change: it measures something else
        print(f"    {run_dir} holds a run with other settings: starting over", flush=True)
        summary = calibrate(resume=False)
    reused = {k: REUSED[k] - reused0[k] for k in REUSED}
    # a run that reused synthesized batches is charged what they cost when they were made
    cpu_seconds = time.process_time() - cpu0 + reused["cpu_seconds"]
    acc = top1(q, evalset[0], evalset[1], device)
    return {"model": model, "recipe": recipe, "method": name, "seed": seed, "top1": acc,
            "seconds": summary["seconds"]["total"] + reused["seconds"], "cpu_seconds": cpu_seconds,
            "stage_seconds": summary["seconds"], "reused_batches": reused["batches"],
            "resumed": summary["resumed"], "final_losses": summary["final_losses"],
            "curves": summary["curves"], "config": summary["config"]}


def print_tables(res: dict) -> None:
    """The tables of ``res``'s cells (mean and std over seeds), as docs/results.md shows them."""
    meta = res.get("meta", {})
    cells = res.get("cells", {})
    print(f"\nTop-1 (%) on {meta.get('eval_images', '?')} {meta.get('split', 'test')} images, mean ± std over seeds "
          f"(calibration wall time, {meta.get('threads', '?')} thread(s))")
    main_methods = [m for m in METHODS if any(c["method"] == m for c in cells.values())]
    for recipe in RECIPES:
        if any(c["recipe"] == recipe and c["method"] in METHODS for c in cells.values()):
            print(f"\n{recipe}\n\n" + result_tables.dfq_recipe_table(res, recipe, main_methods), end="")
    print("\nData-free (maskaq-fast) against real and psaq\n\n" + result_tables.dfq_comparison_table(res), end="")
    ablation = [m for m in ABLATION_COLUMNS if any(c["method"] == m for c in cells.values())]
    for recipe in RECIPES:
        if any(c["recipe"] == recipe and c["method"] in ablation for c in cells.values()):
            print(f"\nAblation, {recipe}\n\n" + result_tables.dfq_recipe_table(res, recipe, ablation), end="")
    if res.get("cpu_seconds"):
        print("\nMean CPU seconds per calibration (over recipes and seeds)\n\n"
              + result_tables.dfq_cpu_table(res, main_methods), end="")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None,
                    help="comma-separated (default: embedded and the 28-px zoo; deit_tiny_patch16_224 by name)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ablation", action="store_true", help="also run the ablation (w4a4 and w3a3 by default)")
    ap.add_argument("--ablation-recipes", default="w4a4,w3a3")
    ap.add_argument("--ablation-seeds", default="0")
    ap.add_argument("--split", choices=("test", "valid"), default="test",
                    help="evaluate on the 10k test images (report) or the 10k valid split (choose settings)")
    ap.add_argument("--mnist", default=None, help="mnist/data/mnist.pkl.gz (needed by --split valid)")
    ap.add_argument("--quick", action="store_true", help="tiny settings and 2000 test images (checks the script)")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate on the first this many images of the split (the 224-px model: a 10k pass of a "
                         "quantized model costs many minutes on a small CPU; give its own --out)")
    ap.add_argument("--out", default=None, help="results JSON (default runs/dfq_accuracy[_valid][_quick].json; "
                    "benchmarks/results/dfq_accuracy.json replaces the figures docs/results.md is made from)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "dfq_accuracy"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--table", action="store_true", help="only print the saved results")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    suffix = ("_valid" if args.split == "valid" else "") + ("_quick" if args.quick else "")
    out = Path(args.out or ROOT / "runs" / f"dfq_accuracy{suffix}.json")
    if args.table:
        print_tables(read_results(out))
        return
    if args.split == "valid" and not args.mnist:
        sys.exit("--split valid needs --mnist mnist/data/mnist.pkl.gz (see scripts/train_embedded.py)")
    specs = {**METHODS, **ABLATIONS}  # an ablation variant may also be asked for by name
    for name in args.methods.split(","):
        if name not in specs:
            sys.exit(f"unknown method {name!r}; choose from {', '.join(specs)}")
    models = args.models.split(",") if args.models else model_names(small_only=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    share_synthesized_images(Path(args.workdir) / ("quick" if args.quick else "full") / "synthesized")
    abl_seeds = [int(s) for s in args.ablation_seeds.split(",")] if args.ablation else []
    for model in models:
        fp, data, _cfg = load_model(model, device)
        evalset = load_valid(args.mnist, data) if args.split == "valid" else load_npz("mnist_test.npz", data)
        if args.quick or args.limit:
            n = args.limit or 2000
            evalset = (evalset[0][:n], evalset[1][:n])
        real = load_npz("mnist_calib.npz", data)
        if isinstance(real[0], Upscaled):  # the calibration takes a tensor: 2000 224-px images are 1.2 GB
            real = (real[0].tensor(), real[1])
        fp_acc = round(top1(fp, evalset[0], evalset[1], device), 2)
        meta = {"fp_top1": {model: fp_acc}, "eval_images": len(evalset[0]), "split": args.split,
                "threads": args.threads, "device": args.device, "torch": torch.__version__, "quick": args.quick}
        print(f"{model}: FP top-1 {fp_acc:.2f} % on {len(evalset[0])} {args.split} images", flush=True)
        # Seed by seed, so that a partial run already has every cell; the ablation after the first seed.
        jobs = []
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            jobs += [(recipe, name, specs[name], seed) for recipe in args.recipes.split(",")
                     for name in args.methods.split(",")]
            if i == 0:
                jobs += [(recipe, name, spec, s) for s in abl_seeds for recipe in args.ablation_recipes.split(",")
                         for name, spec in ABLATIONS.items()]
        for recipe, name, spec, seed in jobs:
            key = f"{model}/{recipe}/{name}/seed{seed}"
            if not claim(out, key):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
            result = run_one(model, name, spec, recipe, seed, args, fp, data, evalset, real, device)
            save_result(out, key, result, meta)
            print(f"[{time.strftime('%H:%M:%S')}] {key}: top-1 {result['top1']:.2f} in {result['seconds']:.0f} s",
                  flush=True)
    print_tables(read_results(out))


if __name__ == "__main__":
    main()
