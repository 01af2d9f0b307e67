"""Top-1 and agreement with torch of the onnxruntime flavour, per CPU-family layout, on the embedded model and
the benchmark zoo: the layouts hold the same quantized values, so their figures must match.

    .venv/bin/python benchmarks/ort_layout_accuracy.py                     # embedded + benchmarks/zoo/*, w8a8
    .venv/bin/python benchmarks/ort_layout_accuracy.py --models embedded --limit 500

Each model is calibrated once (w8a8, the embedded calibration images), traced once, and written in each
layout (export/ortcpu.py): x86-avx2 (uint8 x uint8, the layout before CPU families existed), x86-vnni (uint8 x
int8) and arm (int8 x int8). Every graph runs on this machine's onnxruntime at its default optimization level
on the embedded MNIST test images. A layout whose products this CPU cannot add exactly (x86-vnni on x86
without VNNI) is reported, not hidden.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maskaq_deploy.calib import attach_quantizers, calibrate_observers, get_recipe  # noqa: E402
from maskaq_deploy.calib.calibrate import batches_forward_loop  # noqa: E402
from maskaq_deploy.data import load_image_set  # noqa: E402
from maskaq_deploy.export.ortcpu import CPU_FAMILIES  # noqa: E402
from maskaq_deploy.export.qdq import default_options, trace_quantized, write_qdq  # noqa: E402
from maskaq_deploy.models import ModelConfig, load_model  # noqa: E402
from maskaq_deploy.runtimes import OrtBackend, agreement, cpu  # noqa: E402


def model_configs(names: list[str]) -> dict:
    out = {}
    for name in names:
        if name == "embedded":
            out[name] = ModelConfig()
            continue
        d = ROOT / "benchmarks" / "zoo" / name
        c = json.loads((d / "config.json").read_text())
        out[name] = ModelConfig(name=c["timm_name"], kwargs=c.get("model_kwargs", {}),
                                checkpoint=str(d / "model.safetensors"), mean=tuple(c["mean"]), std=tuple(c["std"]),
                                input_size=tuple(c["input_size"]))
    return out


def logits_of(fn, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    outs, labels = [], []
    for x, y in images.batches(batch_size):
        outs.append(np.asarray(fn(x), dtype=np.float32))
        labels.append(y.numpy())
    return np.concatenate(outs), np.concatenate(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    zoo = sorted(d.name for d in (ROOT / "benchmarks" / "zoo").iterdir() if (d / "model.safetensors").is_file())
    p.add_argument("--models", default=",".join(["embedded", *zoo]))
    p.add_argument("--recipe", default="w8a8")
    p.add_argument("--calib", type=int, default=128, help="calibration images")
    p.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print(f"{cpu.describe()}; recipe {args.recipe}")
    head = f"{'model':<10} {'graph':<14} {'top-1 %':>8} {'agree %':>8}"
    print(head)
    print("-" * len(head))
    tmp = Path(tempfile.mkdtemp(prefix="ort_layout_acc_"))
    for name, cfg in model_configs(args.models.split(",")).items():
        loaded = load_model(cfg)
        calib = load_image_set("embedded:calib", loaded.data_config).subset(args.calib)
        test = load_image_set("embedded:test", loaded.data_config).subset(args.limit)
        q = copy.deepcopy(loaded.model)
        attach_quantizers(q, get_recipe(args.recipe))
        calibrate_observers(q, batches_forward_loop([x for x, _ in calib.batches(args.batch_size)]))
        with torch.no_grad():
            ref, labels = logits_of(lambda x: q(x).numpy(), test, args.batch_size)
        rows = [("torch", ref)]
        marked = trace_quantized(q, default_options(q, input_shape=tuple(loaded.data_config["input_size"]),
                                                    dynamic_batch=True))
        for family in CPU_FAMILIES:
            path = write_qdq(marked, tmp / f"{name}-{family}.onnx", "onnxruntime", cpu=family).path
            with OrtBackend(path) as rt:
                rows.append((f"ort {family}", logits_of(lambda x: rt.run(x.numpy()), test, args.batch_size)[0]))
        for label, logits in rows:
            top1 = 100 * float((logits.argmax(1) == labels).mean())
            print(f"{name:<10} {label:<14} {top1:>8.2f} {100 * agreement(ref, logits):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
