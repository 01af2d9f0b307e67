#!/usr/bin/env python
"""Throughput of one MaskAQ synthesis step and one fine-tune step, in image-iterations per second.

    python benchmarks/synthesis_speed.py                       # deit_tiny_patch16_224, batch 8, CPU, 2 threads
    python benchmarks/synthesis_speed.py --model deit_small_patch16_224 --batch 32 --device cuda \
        --autocast both --steps 20

Models have random weights (pretrained=False); the quantized copy uses ``--recipe`` (default w4a4, the
reference's setting). A synthesis step is: augment, P and Q forward, all five MaskAQ losses, backward to the
pixels, AdamW step, clamp. A fine-tune step is: augment, P forward (no grad), Q forward, KD + masked
attention-output SSIM, backward, SGD step. ``--breakdown`` adds the parts of
a synthesis step measured separately. "cpu s" is the process CPU time per step (all threads): a cross-check
that does not depend on how busy the machine is (with 1 thread it is what an idle machine's wall time would be).

The reference implementation on deit_tiny at batch 8 (2-core CPU): synthesis 2.67 s/step = 3.0 img-it/s and
fine-tune 1.51 s/step = 5.3 img-it/s with 2 threads on an idle machine; 3.45 s and 2.21 s with 1 thread.
"vs ref" compares wall-clock throughput with the reference at the same thread count (that model and batch,
CPU only).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

# The reference implementation's img-it/s on deit_tiny at batch 8 on a 2-core CPU, by torch thread count (1 thread:
# measured while another process held the second core; 2 threads: idle machine).
REFERENCE = {1: {"synthesis": 8 / 3.45, "finetune": 8 / 2.21}, 2: {"synthesis": 8 / 2.67, "finetune": 8 / 1.51}}


def build(model_name: str, recipe: str, device: torch.device):
    import timm

    from maskaq_deploy.calib import RECIPES, attach_quantizers
    from maskaq_deploy.calib.dfq.models import make_teacher

    fp = timm.create_model(model_name, pretrained=False).eval()
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES[recipe])
    q.to(device).eval()
    teacher = make_teacher(fp, q).to(device)
    cfg = fp.pretrained_cfg or {}
    data = {"mean": cfg.get("mean", (0.5,) * 3), "std": cfg.get("std", (0.5,) * 3),
            "input_size": cfg.get("input_size", (3, 224, 224))}
    return fp, q, teacher, data


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else "-"


def run_case(args, autocast: str, device: torch.device) -> list[dict]:
    from maskaq_deploy.calib.calibrate import calibrate_observers
    from maskaq_deploy.calib.dfq.config import DFQConfig, FinetuneConfig, SynthesisConfig
    from maskaq_deploy.calib.dfq.finetune import finetune_epoch, make_optimizer
    from maskaq_deploy.calib.dfq.methods import autocast_dtype_for
    from maskaq_deploy.calib.dfq.models import token_layout
    from maskaq_deploy.calib.dfq.synthesis import SynthesisSetup, synthesize_batch

    _fp, q, teacher, data = build(args.model, args.recipe, device)
    c, h, w = data["input_size"]
    mean = torch.tensor(data["mean"], dtype=torch.float32).reshape(1, -1, 1, 1).to(device)
    std = torch.tensor(data["std"], dtype=torch.float32).reshape(1, -1, 1, 1).to(device)
    noise = torch.randn(max(args.batch, 8), c, h, w, device=device)
    calibrate_observers(q, lambda m: m(noise))
    rows = []
    labels = torch.randint(0, teacher.num_classes, (args.batch,))

    def synth(iters):
        cfg = DFQConfig(batch_size=args.batch, synthesis=SynthesisConfig(iterations=iters), autocast=autocast,
                        log_every=10**6)
        setup = SynthesisSetup(teacher, q, token_layout(teacher), cfg, "maskaq", device, (c, h, w), mean, std,
                               autocast_dtype_for(cfg, device))
        synthesize_batch(setup, labels, seed=0)

    synth(args.warmup)
    _sync(device)
    _peak_reset(device)
    t, t_cpu = time.perf_counter(), time.process_time()
    synth(args.steps)
    _sync(device)
    dt = (time.perf_counter() - t) / args.steps
    rows.append({"step": "synthesis", "autocast": autocast, "s_per_step": dt, "img_it_s": args.batch / dt,
                 "cpu_s": (time.process_time() - t_cpu) / args.steps, "peak_gib": _peak(device)})

    cfg = DFQConfig(finetune=FinetuneConfig(epochs=1, batch_size=args.batch), autocast=autocast, log_every=10**6)
    layout = token_layout(teacher)
    opt = make_optimizer(q, cfg)
    imgs = torch.randn(args.batch * max(args.steps, args.warmup), c, h, w)
    dtype = autocast_dtype_for(cfg, device)
    finetune_epoch(teacher, q, opt, imgs[:args.batch * args.warmup], None, cfg, layout, 0, device, dtype)
    _sync(device)
    _peak_reset(device)
    t, t_cpu = time.perf_counter(), time.process_time()
    finetune_epoch(teacher, q, opt, imgs[:args.batch * args.steps], None, cfg, layout, 0, device, dtype)
    _sync(device)
    dt = (time.perf_counter() - t) / args.steps
    rows.append({"step": "finetune", "autocast": autocast, "s_per_step": dt, "img_it_s": args.batch / dt,
                 "cpu_s": (time.process_time() - t_cpu) / args.steps, "peak_gib": _peak(device)})
    if args.breakdown:
        rows += breakdown(args, teacher, q, data, device, autocast)
    return rows


def breakdown(args, teacher, q, data, device, autocast) -> list[dict]:
    """Parts of a synthesis step, each timed alone (they overlap nothing, so they roughly add up)."""
    from maskaq_deploy.calib.dfq import losses as L
    from maskaq_deploy.calib.dfq.config import DFQConfig
    from maskaq_deploy.calib.dfq.methods import autocast_dtype_for
    from maskaq_deploy.calib.dfq.models import Capture, frozen, token_layout
    from maskaq_deploy.calib.dfq.synthesis import autocast_ctx

    cfg = DFQConfig(autocast=autocast)
    dtype = autocast_dtype_for(cfg, device)
    lay = token_layout(teacher)
    c, h, w = data["input_size"]
    x = torch.randn(args.batch, c, h, w, device=device, requires_grad=True)
    out = []

    def timeit(name, fn):
        fn()
        _sync(device)
        t, t_cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            fn()
        _sync(device)
        dt = (time.perf_counter() - t) / args.steps
        out.append({"step": f"  {name}", "autocast": autocast, "s_per_step": dt, "img_it_s": args.batch / dt,
                    "cpu_s": (time.process_time() - t_cpu) / args.steps, "peak_gib": "-"})

    def fwd_bwd(model):
        def f():
            with autocast_ctx(device, dtype):
                y = model(x)
            y.float().sum().backward()
            x.grad = None
        return f

    timeit("P fwd+bwd to input", fwd_bwd(teacher))
    with frozen(q):
        timeit("Q fwd+bwd to input", fwd_bwd(q))
    with Capture(teacher) as cap, torch.no_grad(), autocast_ctx(device, dtype):
        teacher(x)
        logits = [t.detach().clone().requires_grad_(True) for t in cap.logits()]

    def stats(**kw):
        return [L.attention_stats(t, lay.num_prefix, **kw) for t in logits]

    def interhead():
        st = stats(pairs=True)
        return L.interhead_ssim_from_stats(*(torch.stack([getattr(s, k) for s in st])
                                             for k in ("mu", "lo", "hi", "gram")))

    def entropy():
        return L.similarity_entropy_headmean(torch.stack([s.headmean for s in stats(headmean=True)]), 64)

    def mask():
        sp = torch.stack([s.cls for s in stats(cls=True)])
        m = L.informative_mask(sp.detach().mean(0), 0.3)
        return L.masked_l1(sp, sp.detach() * 0.9, m)

    for name, fn in [("interhead SSIM f+b", interhead), ("entropy f+b", entropy), ("mask + masked L1 f+b", mask)]:
        def f(fn=fn):
            fn().backward()
            for t in logits:
                t.grad = None
        timeit(name, f)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=("off", "bf16", "both", "auto"), default="auto")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--recipe", default="w4a4")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the rows into this results file (benchmarks/results/synthesis_speed.json: "
                         "replaces the rows of the same step, threads and autocast that docs/results.md shows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    modes = ("off", "bf16") if args.autocast == "both" else (args.autocast,)
    rows = []
    for mode in modes:
        rows += run_case(args, mode, device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model}  batch {args.batch}  recipe {args.recipe}  device {args.device}  "
          f"threads {args.threads}  steps {args.steps}  load avg {load:.2f}  torch {torch.__version__}")
    if device.type == "cuda":
        print(f"gpu {torch.cuda.get_device_name()}")
    print(f"{'step':<26} {'autocast':>8} {'s/step':>9} {'cpu s':>8} {'img-it/s':>9} {'vs ref':>7} {'peak GiB':>9}")
    for r in rows:
        ref = REFERENCE.get(args.threads, {}).get(r["step"])
        comparable = ref and args.model == "deit_tiny_patch16_224" and args.batch == 8 and device.type == "cpu"
        ratio = f"{r['img_it_s'] / ref:.2f}x" if comparable else "-"
        print(f"{r['step']:<26} {r['autocast']:>8} {r['s_per_step']:>9.4f} {r['cpu_s']:>8.3f} {r['img_it_s']:>9.2f} "
              f"{ratio:>7} "
              f"{r['peak_gib']:>9}")
        r["threads"] = args.threads
        if comparable:
            r["vs_reference"] = round(r["img_it_s"] / ref, 3)
    if args.json:
        write_json(args, rows, device)


def write_json(args, rows: list[dict], device: torch.device) -> None:
    """Merge ``rows`` into the results file ``args.json`` (a file measured with other settings starts over)."""
    import platform
    import sys
    from pathlib import Path

    import result_tables

    path = Path(args.json)
    meta = {"model": args.model, "batch": args.batch, "recipe": args.recipe, "device": args.device,
            "reference_s_per_step": {str(t): {k: round(8 / v, 2) for k, v in ref.items()}
                                     for t, ref in REFERENCE.items()}}
    res = result_tables.load(path) if path.is_file() else {}
    if any(res.get("meta", {}).get(k) != meta[k] for k in ("model", "batch", "recipe", "device")):
        res = {}
    res.update(benchmark="synthesis_speed", meta=meta)
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    machine = f"{os.cpu_count()}-core {platform.machine()} CPU{gpu} (torch {torch.__version__})"
    keep = [{k: v for k, v in r.items() if k in ("step", "threads", "autocast", "s_per_step", "cpu_s", "img_it_s",
                                                  "vs_reference", "peak_gib")} for r in rows]
    if result_tables.merge_rows(res, keep, ("step", "threads", "autocast"),
                                "python benchmarks/synthesis_speed.py " + " ".join(sys.argv[1:])):
        res["machine"] = machine
    else:  # rows measured elsewhere remain: say where the new ones ran
        res["machine"] = f"{res.get('machine', 'not recorded')}; the rows of {sys.argv[1:]}: {machine}"
    result_tables.write_atomic(path, res)


if __name__ == "__main__":
    main()
