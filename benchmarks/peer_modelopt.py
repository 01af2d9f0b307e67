"""Our TensorRT-flavour QDQ graphs beside NVIDIA Model Optimizer's ONNX PTQ of the same float graph.

    .venv/bin/python benchmarks/peer_modelopt.py --modelopt-python ../modelopt-venv/bin/python
    .venv/bin/python benchmarks/peer_modelopt.py --modelopt-python PY --limit 2000 --work /tmp/peer --reuse

Model Optimizer lives in its own virtual environment (``pip install "nvidia-modelopt[onnx]"`` pulls
onnxruntime-gpu, cupy and the CUDA wheels, about 6.5 GB, and pins its own onnx), so this script runs twice:
in this project's environment it calibrates, exports and evaluates; with ``--modelopt-quantize`` (started by
itself through ``--modelopt-python``) it only calls ``modelopt.onnx.quantization.quantize`` and imports
nothing of this project.

On the embedded model:

1. ``w8a8`` and ``fp8`` checkpoints, calibrated on real images (``--method real``: the preset's 256 images of
   ``embedded:calib``), exported for TensorRT (fp16 float path, float32 I/O);
2. the float graph of the same model (dynamic batch), and the same 256 calibration images, handed to
   Model Optimizer's ``int8`` and ``fp8`` modes with their defaults (fp16 for the unquantized ops);
3. every graph run by onnxruntime on the CPU (this environment's onnxruntime, ``--threads`` intra-op threads)
   over the test images, against the float graph: top-1, agreement, logit SQNR; plus our TensorRT rule
   checker's findings, Q/DQ node counts and file size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

RECIPES = ("w8a8", "fp8")
MODELOPT_MODES = ("int8", "fp8")


def modelopt_quantize(mode: str, onnx_path: str, calib: str, out: str) -> None:
    """Model Optimizer's ONNX PTQ with its defaults (run inside Model Optimizer's environment)."""
    import modelopt
    from modelopt.onnx.quantization import quantize

    images = np.load(calib)["images"]
    quantize(onnx_path, quantize_mode=mode, calibration_data={"input": images}, calibration_eps=["cpu"],
             output_path=out)
    print(json.dumps({"modelopt": modelopt.__version__, "mode": mode, "out": out}))


def prepare(work: Path, reuse: bool) -> tuple[dict, np.ndarray]:
    """Calibrate and export ours; write the float graph and the calibration images. Returns (graphs, calib)."""
    from maskaq_deploy.calib import load_quantized_checkpoint
    from maskaq_deploy.config import CalibrateConfig
    from maskaq_deploy.data import load_image_set
    from maskaq_deploy.export import export_fp_onnx
    from maskaq_deploy.models import ModelConfig
    from maskaq_deploy.pipeline import calibrate, export_run
    from maskaq_deploy.run import Run

    graphs = {}
    for recipe in RECIPES:
        run = work / recipe
        if not (reuse and (run / "manifest.json").is_file()):
            calibrate(ModelConfig(), CalibrateConfig(method="real", recipe=recipe), run, force=True)
        path = run / "model.qdq.trt.onnx"
        if not (reuse and path.is_file()):
            export_run(Run(run), "tensorrt", out=path, fp_too=False, dynamic_batch=True)
        graphs[f"ours {recipe}"] = path
    qmodel, manifest = load_quantized_checkpoint(work / RECIPES[0])
    fp = work / "model.fp.onnx"
    if not (reuse and fp.is_file()):
        export_fp_onnx(qmodel, fp, dynamic_batch=True)  # quantizers off: the float model
    n, seed = manifest["dfq_config"]["num_images"], manifest["seed"]
    calib = load_image_set("embedded:calib", manifest["model"]["data_config"], "calibration").subset(n, seed)
    images = np.concatenate([x.numpy() for x, _ in calib.batches(256)]).astype(np.float32)
    return {"float": fp, **graphs}, images


def logits_of(path: Path, images: np.ndarray, threads: int) -> np.ndarray:
    from maskaq_deploy.runtimes.ort_backend import OrtBackend

    with OrtBackend(path, threads=threads) as rt:
        return np.concatenate([rt.run(images[i:i + 500]) for i in range(0, len(images), 500)])


def describe(path: Path) -> dict:
    import onnx

    from maskaq_deploy.export.rules import check_tensorrt

    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    findings = [v for v in check_tensorrt(model) if v.severity == "error"]
    return {"q": ops.count("QuantizeLinear"), "dq": ops.count("DequantizeLinear"), "mb": path.stat().st_size / 1e6,
            "findings": len(findings), "rules": sorted({v.rule for v in findings})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelopt-python", help="python of the environment with nvidia-modelopt[onnx]")
    ap.add_argument("--work", default="peer-modelopt", help="working directory (runs, graphs, images)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    ap.add_argument("--reuse", action="store_true", help="keep runs and graphs already in --work")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the table into this results file (benchmarks/results/peer_modelopt.json: "
                         "replaces the figures docs/results.md shows)")
    ap.add_argument("--modelopt-quantize", nargs=4, metavar=("MODE", "ONNX", "CALIB_NPZ", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.modelopt_quantize:
        modelopt_quantize(*args.modelopt_quantize)
        return 0
    if not args.modelopt_python:
        ap.error("--modelopt-python is required (the python of Model Optimizer's own environment)")

    import onnxruntime
    import torch

    from maskaq_deploy.calib.checkpoint import read_manifest
    from maskaq_deploy.data import load_image_set
    from maskaq_deploy.runtimes.compare import compare_logits

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    graphs, calib = prepare(work, args.reuse)
    np.savez(work / "calib.npz", images=calib)
    for mode in MODELOPT_MODES:
        out = work / f"modelopt_{mode}.onnx"
        if not (args.reuse and out.is_file()):
            done = subprocess.run([args.modelopt_python, __file__, "--modelopt-quantize", mode, str(graphs["float"]),
                                   str(work / "calib.npz"), str(out)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
        graphs[f"modelopt {mode}"] = out
    asked = subprocess.run([args.modelopt_python, "-c", "import modelopt; print(modelopt.__version__)"],
                           capture_output=True, text=True, check=False)
    version = asked.stdout.strip().splitlines()[-1] if asked.returncode == 0 and asked.stdout.strip() else "?"

    data_config = read_manifest(work / RECIPES[0])["model"]["data_config"]
    test = load_image_set("embedded:test", data_config, "test").subset(args.limit)
    xs, ys = zip(*test.batches(1000))
    images, labels = np.concatenate([x.numpy() for x in xs]), np.concatenate([y.numpy() for y in ys])
    ref = logits_of(graphs["float"], images, args.threads)
    print(f"embedded model, {len(images)} test images, onnxruntime {onnxruntime.__version__} CPU "
          f"({args.threads} thread(s)), nvidia-modelopt {version}, torch {torch.__version__}\n")
    print("| graph | onnxruntime top-1 | agreement vs FP | logit SQNR vs FP | TensorRT-rule findings | Q / DQ nodes "
          "| file size |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, path in graphs.items():
        out = ref if name == "float" else logits_of(path, images, args.threads)
        m = compare_logits(ref, out)
        d = describe(path)
        rules = f" ({', '.join(d['rules'])})" if d["rules"] else ""
        sq = "-" if name == "float" else f"{m['sqnr_db']:.1f} dB"
        top1 = 100 * float((out.argmax(1) == labels).mean())
        print(f"| {name} | {top1:.2f} | {100 * m['top1_agreement']:.2f}% "
              f"| {sq} | {d['findings']}{rules} | {d['q']} / {d['dq']} | {d['mb']:.2f} MB |")
        rows.append({"graph": name, "onnxruntime_top1": round(top1, 2),
                     "agreement": round(100 * m["top1_agreement"], 2),
                     "sqnr_db": None if name == "float" else round(m["sqnr_db"], 1), "findings": d["findings"],
                     "rules": list(d["rules"]), "q": d["q"], "dq": d["dq"], "mb": round(d["mb"], 2)})
    if args.json:
        import platform

        import result_tables

        res = {"benchmark": "peer_modelopt", "source": {}, "machine":
               f"{os.cpu_count()}-core {platform.machine()} CPU; onnxruntime {onnxruntime.__version__} on the CPU "
               f"({args.threads} thread(s)), nvidia-modelopt {version}, torch {torch.__version__}",
               "meta": {"model": "embedded", "eval_images": len(images), "threads": args.threads,
                        "onnxruntime": onnxruntime.__version__, "modelopt": version, "torch": torch.__version__}}
        result_tables.merge_rows(res, rows, ("graph",), "python benchmarks/peer_modelopt.py " + " ".join(sys.argv[1:]))
        result_tables.write_atomic(Path(args.json), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
