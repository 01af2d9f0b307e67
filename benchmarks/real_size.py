#!/usr/bin/env python
"""Cost of every stage at the size users deploy (224 px), and the predicted wall time of each preset.

    python benchmarks/real_size.py                   # 3 models x CPU 1 and 2 threads (+ CUDA when present)
    python benchmarks/real_size.py --models deit_tiny_patch16_224 --threads 1 --no-write    # one quick row

Models: ``deit_tiny_patch16_224``, ``deit_small_patch16_224``, ``swin_tiny_patch4_window7_224`` from timm with
random weights (``pretrained=False``: no pretrained weights exist on the machines this ran on; cost does not
depend on the weights). Every (model, device, threads, stage) runs in its own subprocess, so its peak resident
memory (``ru_maxrss``) is that stage's alone.

Stages and what is extrapolated (few steps each, so the whole run stays around 15 minutes on 2 cores):

* ``synthesis``: MaskAQ steps (P and Q forward, the five losses, backward to the pixels, AdamW) at
  ``--synth-batch`` images (default 8, not the preset's 64: a step's cost and its activation memory grow
  linearly with the batch at 224 px, measured 8 vs 16 on deit_tiny), with Q at w4a4; fp32 and, on a CPU with
  AVX512-BF16 / AMX or on CUDA, bf16 autocast. One warm-up step, then ``--steps`` timed. At 1 thread also at
  half the batch: the difference of the two peaks is the activation memory per image.
* ``reconstruction``: ``--recon-steps`` Adam steps on one unit (``blocks.0`` / Swin's first block) at the
  reconstruction batch (32); the per-unit cost adds the unit input/output passes over the preset's images.
* ``finetune``: fine-tune steps at the paper's batch (16) (only the paper preset fine-tunes).
* ``verify``: the w8a8 onnxruntime QDQ export (its seconds: ``export``), then onnxruntime seconds per image
  (batch 8) and the torch fake-quant forward per image.

Predictions (``predict``): a preset's synthesis is ``batches x iterations x step`` spread over one one-thread
worker process per thread (as ``calibrate`` runs it on a CPU), with the step scaled linearly from the measured
batch to the preset's; reconstruction ``units x (iters x step + unit passes)``; observer calibration one Q pass
over the set. ``build`` (default) is ``calibrate --preset fast`` at w8a8 + export + verify on
``VERIFY_IMAGES`` images. Peak memory of a preset's synthesis is the model's resident base plus, per worker,
the measured activation bytes scaled to the preset's batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "real_size.json"
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
VERIFY_IMAGES = 1000  # images a default build verifies on (a user's --val-data; the figure is per image anyway)
STAGES = ("synthesis", "reconstruction", "finetune", "verify")


# ------------------------------------------------------------------------------------------------ one stage

def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _models(name: str, recipe: str, device):
    import copy

    import timm
    import torch

    from maskaq_deploy.calib import RECIPES, attach_quantizers
    from maskaq_deploy.calib.calibrate import calibrate_observers
    from maskaq_deploy.calib.dfq.models import make_teacher

    torch.manual_seed(0)
    fp = timm.create_model(name, pretrained=False).eval()
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES[recipe])
    q.to(device).eval()
    noise = torch.randn(8, 3, 224, 224, device=device)
    calibrate_observers(q, lambda m: m(noise))
    return fp, q, make_teacher(fp, q).to(device)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, n: int) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n


def run_stage(args) -> dict:
    """One stage in this process; returns its row (timings, peak memory)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from maskaq_deploy.calib.dfq.config import DFQConfig
    from maskaq_deploy.calib.dfq.models import token_layout

    fp, q, teacher = _models(args.model, "w8a8" if args.stage == "verify" else "w4a4", device)
    layout = token_layout(teacher)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss_now_mib()
    row: dict = {"model": args.model, "stage": args.stage, "device": device.type, "threads": args.threads,
                 "autocast": args.autocast}
    mean = torch.full((1, 3, 1, 1), 0.5, device=device)
    std = torch.full((1, 3, 1, 1), 0.5, device=device)
    dtype = torch.bfloat16 if args.autocast == "bf16" else None
    if args.stage == "synthesis":
        from maskaq_deploy.calib.dfq.synthesis import SynthesisSetup, synthesize_batch

        labels = torch.arange(args.synth_batch) % teacher.num_classes

        def synth(iters):
            cfg = DFQConfig.from_preset("fast", batch_size=args.synth_batch, log_every=10**6,
                                        synthesis={"iterations": iters})
            setup = SynthesisSetup(teacher, q, layout, cfg, "maskaq", device, (3, 224, 224), mean, std, dtype)
            synthesize_batch(setup, labels, seed=0)

        synth(1)  # warm-up (allocator, kernels)
        t = time.perf_counter()
        synth(args.steps)
        _sync(device)
        s = (time.perf_counter() - t) / args.steps
        row.update(batch=args.synth_batch, s_per_step=s, img_steps_per_s=args.synth_batch / s)
    elif args.stage == "reconstruction":
        from maskaq_deploy.calib.dfq.reconstruct import reconstruct_unit, reconstruction_units, unit_io

        cfg = DFQConfig.from_preset("fast")
        rb = cfg.reconstruction.batch_size
        images = torch.randn(rb, 3, 224, 224)
        unit = reconstruction_units(q)[0]
        x_p, target = unit_io(teacher, unit, images, rb, device)
        x_q, _ = unit_io(q, unit, images, rb, device, want_output=False)
        run = DFQConfig.from_preset("fast", recon_iters=1)
        reconstruct_unit(q.get_submodule(unit), x_p, x_q, target, run, 0, device)  # warm-up
        # iters steps + the before/after error passes; the passes are measured apart and taken off
        t_err = _timed(lambda: reconstruct_unit(q.get_submodule(unit), x_p, x_q, target,
                                                DFQConfig.from_preset("fast", recon_iters=1), 0, device), device, 1)
        run = DFQConfig.from_preset("fast", recon_iters=args.recon_steps + 1)
        t_all = _timed(lambda: reconstruct_unit(q.get_submodule(unit), x_p, x_q, target, run, 0, device), device, 1)
        step = max(1e-6, (t_all - t_err) / args.recon_steps)
        with torch.no_grad():
            fwd_p = _timed(lambda: teacher(images.to(device)), device, 1) / rb
            fwd_q = _timed(lambda: q(images.to(device)), device, 1) / rb
        row.update(batch=rb, s_per_step=step, units=len(reconstruction_units(q)), fwd_p_s_per_img=fwd_p,
                   fwd_q_s_per_img=fwd_q)
    elif args.stage == "finetune":
        from maskaq_deploy.calib.dfq.config import FinetuneConfig
        from maskaq_deploy.calib.dfq.finetune import finetune_epoch, make_optimizer

        fb = 16
        cfg = DFQConfig(finetune=FinetuneConfig(epochs=1, batch_size=fb), log_every=10**6)
        opt = make_optimizer(q, cfg)
        imgs = torch.randn(fb * (args.steps + 1), 3, 224, 224)
        finetune_epoch(teacher, q, opt, imgs[:fb], None, cfg, layout, 0, device, dtype)
        s = _timed(lambda: finetune_epoch(teacher, q, opt, imgs[fb:], None, cfg, layout, 0, device, dtype),
                   device, 1) / args.steps
        row.update(batch=fb, s_per_step=s)
    elif args.stage == "verify":
        import tempfile

        import numpy as np

        from maskaq_deploy.export.qdq import export_qdq_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.qdq.onnx"
            t = time.perf_counter()
            export_qdq_onnx(q.cpu(), path, flavour="onnxruntime", batch_size=8)
            row["export_s"] = time.perf_counter() - t
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
            name = sess.get_inputs()[0].name
            sess.run(None, {name: x})
            row["ort_s_per_img"] = _timed(lambda: sess.run(None, {name: x}), device, 3) / 8
            xt = torch.from_numpy(x)
            with torch.no_grad():
                q.cpu()(xt)
                row["torch_s_per_img"] = _timed(lambda: q(xt), torch.device("cpu"), 1) / 8
    row["rss_base_mib"] = base
    row["peak_rss_mib"] = _peak_mib()
    if device.type == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


# ------------------------------------------------------------------------------------------------ predictions

def _preset_runs():
    from maskaq_deploy.calib.dfq.config import DFQConfig

    fast4 = DFQConfig.from_preset("fast").for_bit_widths([4, 4])
    fast8 = DFQConfig.from_preset("fast").for_bit_widths([8, 8])
    paper = DFQConfig.from_preset("paper")
    return {"fast (w4a4)": fast4, "fast (w8a8)": fast8, "paper (w4a4)": paper}


def predict(rows: list[dict], model: str, device: str, threads: int) -> dict:
    """Predicted seconds (and synthesis peak memory) of each preset and of the default build."""
    def get(stage, **kw):
        for r in rows:
            if (r["model"], r["stage"], r["device"]) == (model, stage, device) and all(r.get(k) == v
                                                                                        for k, v in kw.items()):
                return r
        return None

    one = 1 if device == "cpu" else threads  # synthesis workers: one-thread processes on a CPU
    syn = get("synthesis", threads=one, autocast="off", batch=max(r.get("batch", 0) for r in rows
                                                                    if r["stage"] == "synthesis"))
    small = [r for r in rows if (r["model"], r["stage"], r["device"], r["threads"], r["autocast"]) ==
             (model, "synthesis", device, one, "off") and syn and r["batch"] < syn["batch"]]
    rec = get("reconstruction", threads=threads)
    ft = get("finetune", threads=threads)
    ver = get("verify", threads=threads)
    if not (syn and rec):
        return {}
    workers = threads if device == "cpu" else 1
    out = {}
    for name, cfg in _preset_runs().items():
        n_batches = math.ceil(cfg.num_images / cfg.batch_size)
        step = syn["s_per_step"] * cfg.batch_size / syn["batch"]
        rounds = 1
        ft_s = 0.0
        if cfg.finetune.epochs:
            rounds = math.ceil(cfg.finetune.epochs / cfg.finetune.refresh_every) if cfg.finetune.refresh_every else 1
            if ft:
                ft_s = cfg.finetune.epochs * cfg.num_images / ft["batch"] * ft["s_per_step"]
        synth_s = rounds * math.ceil(n_batches / workers) * cfg.synthesis.iterations * step
        passes = cfg.num_images * (rec["fwd_p_s_per_img"] + rec["fwd_q_s_per_img"])
        recon_s = rec["units"] * (cfg.reconstruction.iters * rec["s_per_step"] + 0.5 * passes) if \
            cfg.reconstruction.iters else 0.0
        calib_s = cfg.num_images * rec["fwd_q_s_per_img"]
        # activation memory per image: the slope between two batch sizes (a fixed part does not scale)
        if small:
            per_img = (syn["peak_rss_mib"] - small[0]["peak_rss_mib"]) / (syn["batch"] - small[0]["batch"])
            fixed = syn["peak_rss_mib"] - per_img * syn["batch"]
        else:
            per_img, fixed = (syn["peak_rss_mib"] - syn["rss_base_mib"]) / syn["batch"], syn["rss_base_mib"]
        out[name] = {"synthesis_s": synth_s, "reconstruction_s": recon_s, "calibration_s": calib_s,
                     "finetune_s": ft_s, "total_s": synth_s + recon_s + calib_s + ft_s,
                     "synthesis_peak_rss_mib": fixed + workers * per_img * cfg.batch_size,
                     "synthesis_mib_per_image": per_img}
    if not ver:
        return out
    fast8 = out["fast (w8a8)"]
    verify_s = VERIFY_IMAGES * (ver["ort_s_per_img"] + ver["torch_s_per_img"] + rec["fwd_p_s_per_img"])
    out["build (default)"] = {"total_s": fast8["total_s"] + ver["export_s"] + verify_s, "export_s": ver["export_s"],
                              "verify_s": verify_s, "synthesis_peak_rss_mib": fast8["synthesis_peak_rss_mib"]}
    return out


# ------------------------------------------------------------------------------------------------ driver

def machine() -> dict:
    import torch

    from maskaq_deploy.runtimes import cpu as cpuinfo

    flags = cpuinfo.cpu_flags()
    info = {"cpu": cpuinfo.cpu_model(), "cores": os.cpu_count(),
            "flags": [f for f in cpuinfo.REPORTED_FLAGS if f in flags],
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bf16_cpu() -> bool:
    from maskaq_deploy.runtimes import cpu as cpuinfo

    return bool({"avx512_bf16", "amx_bf16"} & cpuinfo.cpu_flags())


def spawn(args, model, stage, device, threads, autocast, batch) -> dict | None:
    cmd = [sys.executable, __file__, "--stage", stage, "--model", model, "--device", device,
           "--threads", str(threads), "--autocast", autocast, "--steps", str(args.steps),
           "--recon-steps", str(args.recon_steps), "--synth-batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.stage_timeout)
    line = [x for x in p.stdout.splitlines() if x.startswith("ROW ")]
    if p.returncode or not line:
        print(f"  {model} {stage} {device} x{threads} {autocast}: failed ({p.returncode}): "
              f"{(p.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    row = json.loads(line[-1][4:])
    row["wall_s"] = round(time.perf_counter() - t, 1)
    print(f"  {model} {stage} {device} x{threads} {autocast}: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        if k not in ("model", "stage", "device", "threads", "autocast")), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", default="1,2", help="CPU torch thread counts")
    ap.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), cpu or cuda")
    ap.add_argument("--steps", type=int, default=2, help="timed synthesis / fine-tune steps per row")
    ap.add_argument("--recon-steps", type=int, default=3)
    ap.add_argument("--synth-batch", type=int, default=8)
    ap.add_argument("--stage-timeout", type=int, default=300)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    # one stage in this process (what the driver spawns)
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--model")
    ap.add_argument("--autocast", default="off", choices=("off", "bf16"))
    args = ap.parse_args(argv)
    if args.stage:
        args.threads = int(args.threads)
        print("ROW " + json.dumps(run_stage(args)), flush=True)
        return 0

    import torch

    devices = [("cpu", int(t)) for t in args.threads.split(",")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(("cuda", 1))
    t0 = time.perf_counter()
    rows: list[dict] = []
    models = args.models.split(",")
    for model in models:
        for device, threads in devices:
            autocasts = ["off"] + (["bf16"] if device == "cuda" or bf16_cpu() else [])
            for stage in [s for s in STAGES if s in args.stages.split(",")]:
                if stage == "finetune" and threads != max(t for d, t in devices if d == device):
                    continue  # only the paper preset fine-tunes: measured at the largest thread count only
                for ac in (autocasts if stage == "synthesis" else ["off"]):
                    # a second, smaller batch (1 thread, fp32) gives the activation memory per image
                    small = stage == "synthesis" and ac == "off" and threads == 1
                    for batch in ([args.synth_batch // 2] if small else []) + [args.synth_batch]:
                        r = spawn(args, model, stage, device, threads, ac, batch)
                        if r:
                            rows.append(r)
    preds = [{"model": m, "device": d, "threads": t, "presets": predict(rows, m, d, t)}
             for m in models for d, t in devices]
    m = machine()
    where = f"{m['cpu']}, {m['cores']} cores ({' '.join(m['flags'])}), torch {m['torch']}" + (
        f", GPU {m['gpu']}" if "gpu" in m else ", no GPU")
    result = {"benchmark": "real_size", "machine": where, "machine_detail": m,
              "source": {"commands": ["python benchmarks/real_size.py"
                                      + (f" {' '.join(argv or sys.argv[1:])}" if (argv or sys.argv[1:]) else "")]},
              "weights": "random (timm pretrained=False)",
              "image_size": 224, "synth_batch": args.synth_batch, "steps": args.steps,
              "recon_steps": args.recon_steps, "verify_images": VERIFY_IMAGES,
              "benchmark_wall_s": round(time.perf_counter() - t0, 1), "rows": rows, "predictions": preds}
    print(json.dumps(preds, indent=1))
    if not args.no_write:
        out = Path(args.out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
