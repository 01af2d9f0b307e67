"""onnxruntime CPU latency: FP32 vs our QDQ exports vs onnxruntime's own quantizers, in one table.

    .venv/bin/python benchmarks/ort_latency.py                      # embedded, deit_tiny, deit_small; batch 1, 8
    .venv/bin/python benchmarks/ort_latency.py --quick              # fewer iterations, deit_tiny + embedded
    .venv/bin/python benchmarks/ort_latency.py --threads 2 --iterations 50 --profile
    .venv/bin/python benchmarks/ort_latency.py --keep /tmp/bench --reuse    # re-time exported models
    .venv/bin/python benchmarks/ort_latency.py --threads 1,2 --profile --markdown docs/onnxruntime.md

``--markdown FILE`` writes the table (with the CPU, its flags, the onnxruntime version and the command) into
FILE between the lines ``<!-- ort_latency:begin -->`` and ``<!-- ort_latency:end -->`` (the whole file when
it has no such lines); ``--json FILE`` writes the rows and the machine as JSON.

Variants, all exported with a dynamic batch and run by runtimes.OrtBackend (CPU provider, default
optimization level, the given intra-op threads) on the same random input, timed round-robin (one run of each
variant in turn) so that load from other processes hits all of them alike:

    fp32            torch -> ONNX float graph (export_fp_onnx)
    ours-w8a8       our w8a8 export, flavour onnxruntime, laid out for this CPU (calibrated on random / real
                    batches)
    ours-w4a16      our w4a16 export, flavour onnxruntime (MatMulNBits, float activations)
    ort-static      onnxruntime.quantization.quantize_static(QDQ, per-channel, u8 activations / s8 weights),
                    calibrated on the same batches
    ort-dynamic     onnxruntime.quantization.quantize_dynamic(s8 weights)

Weights are random for the timm models (speed only). ``--profile`` runs onnxruntime's profiler on every
variant at the largest batch and prints where the time goes, by op type (the kernel path each graph took).
The last column, "ours vs best peer", is the faster of ort-static / ort-dynamic divided by ours-w8a8: 1.00x or
more means our graph is at least as fast as onnxruntime's own quantizers.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskaq_deploy.calib import attach_quantizers, calibrate_observers, get_recipe  # noqa: E402
from maskaq_deploy.calib.calibrate import batches_forward_loop  # noqa: E402
from maskaq_deploy.export.onnx_export import export_fp_onnx  # noqa: E402
from maskaq_deploy.export.qdq import export_qdq_onnx  # noqa: E402
from maskaq_deploy.runtimes import OrtBackend, benchmark_interleaved, cpu  # noqa: E402
from maskaq_deploy.runtimes.bench import kernel_summary, profile_ops  # noqa: E402

log = logging.getLogger("ort_latency")

VARIANTS = ("fp32", "ours-w8a8", "ours-w4a16", "ort-static", "ort-dynamic")
PEERS = ("ort-static", "ort-dynamic")
BEGIN, END = "<!-- ort_latency:begin -->", "<!-- ort_latency:end -->"


def load_subject(name: str, calib_batches: int, calib_batch_size: int):
    """(model, input shape, calibration batches) for "embedded" or a timm model name (random weights)."""
    gen = torch.Generator().manual_seed(0)
    if name == "embedded":
        from maskaq_deploy.data import load_image_set
        from maskaq_deploy.models import ModelConfig, load_model

        loaded = load_model(ModelConfig())
        shape = tuple(loaded.data_config["input_size"])
        calib = load_image_set("embedded:calib", loaded.data_config).subset(calib_batches * calib_batch_size)
        return loaded.model, shape, [x for x, _ in calib.batches(calib_batch_size)]
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    shape = tuple(model.pretrained_cfg["input_size"])
    return model, shape, [torch.randn(calib_batch_size, *shape, generator=gen) for _ in range(calib_batches)]


def build_variants(name: str, workdir: Path, args) -> tuple[dict, tuple]:
    """Export every variant of model ``name`` into ``workdir``; returns ({variant: path}, input shape).

    With ``--reuse``, models already in ``workdir`` (from an earlier ``--keep`` run) are timed as they are.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static

    cached = {v: workdir / f"{v}.onnx" for v in VARIANTS}
    if args.reuse and all(p.is_file() for p in cached.values()) and (workdir / "shape.json").is_file():
        return cached, tuple(json.loads((workdir / "shape.json").read_text()))
    model, shape, calib = load_subject(name, args.calib_batches, args.calib_batch_size)
    (workdir / "shape.json").write_text(json.dumps(list(shape)))
    paths = {}
    t0 = time.perf_counter()
    paths["fp32"] = export_fp_onnx(model, workdir / "fp32.onnx", input_shape=shape, dynamic_batch=True)
    for recipe in ("w8a8", "w4a16"):
        q = copy.deepcopy(model)
        attach_quantizers(q, get_recipe(recipe))
        calibrate_observers(q, batches_forward_loop(calib))
        paths[f"ours-{recipe}"] = export_qdq_onnx(q, workdir / f"ours-{recipe}.onnx", flavour="onnxruntime",
                                                  input_shape=shape, dynamic_batch=True).path

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"input": b.numpy()} for b in calib])

        def get_next(self):
            return next(self._it, None)

    paths["ort-static"] = workdir / "ort-static.onnx"
    quantize_static(str(paths["fp32"]), str(paths["ort-static"]), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    paths["ort-dynamic"] = workdir / "ort-dynamic.onnx"
    quantize_dynamic(str(paths["fp32"]), str(paths["ort-dynamic"]), weight_type=QuantType.QInt8)
    log.info("%s: exported %d variants in %.0f s", name, len(paths), time.perf_counter() - t0)
    return paths, shape


def machine() -> dict:
    """What the figures were measured on."""
    import onnxruntime

    flags = cpu.cpu_flags()
    return {"cpu": cpu.cpu_model(), "family": cpu.detect(flags),
            "flags": [f for f in cpu.REPORTED_FLAGS if f in flags], "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "date": datetime.date.today().isoformat()}


def markdown(rows: list[dict], profiles: dict, info: dict, command: str) -> str:
    """The table (and the kernel paths) as markdown, with the machine and the command that made it."""
    fp = {(r["model"], r["batch"], r["threads"]): r["median_ms"] for r in rows if r["label"] == "fp32"}
    cells = {(r["model"], r["batch"], r["threads"], r["label"]): r["median_ms"] for r in rows}
    lines = [f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores; {info['family']}: "
             f"{' '.join(info['flags'])}), onnxruntime {info['onnxruntime']}, with", "",
             f"    {command}", "",
             "Median ms (x FP32 speed); variants timed round-robin in one run.", "",
             "| model | batch | threads | " + " | ".join(VARIANTS) + " | ours vs best peer |",
             "|---|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for model, batch, threads in sorted(fp, key=lambda k: (k[0], k[2], -k[1])):
        row = [model, str(batch), str(threads)]
        for v in VARIANTS:
            ms = cells.get((model, batch, threads, v))
            row.append("-" if ms is None else f"{ms:.1f}" if v == "fp32" else
                       f"{ms:.1f} ({fp[(model, batch, threads)] / ms:.2f}x)")
        ours = cells.get((model, batch, threads, "ours-w8a8"))
        peers = [cells[(model, batch, threads, p)] for p in PEERS if (model, batch, threads, p) in cells]
        row.append(f"**{min(peers) / ours:.2f}x**" if ours and peers else "-")
        lines.append("| " + " | ".join(row) + " |")
    if profiles:
        lines += ["", "Kernel path (top op types by share of kernel time, onnxruntime's profiler):", ""]
        for (model, variant), (batch, threads, ops) in profiles.items():
            lines.append(f"* {model} {variant} (batch {batch}, {threads} threads): {kernel_summary(ops, 5)}")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, block: str) -> None:
    """Put ``block`` between the markers in ``path`` (or make ``path`` the block), atomically."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = f"{head}{BEGIN}\n{block}{END}{tail}"
    else:
        text = f"{BEGIN}\n{block}{END}\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _timing_args(argv) -> list[str]:
    """The command-line arguments that decide the figures (not where they are written)."""
    out, skip = [], False
    for a in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif a in ("--markdown", "--json", "--keep"):
            skip = True
        elif not a.startswith(("--markdown=", "--json=", "--keep=", "--reuse")):
            out.append(a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated: embedded and/or timm names")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", default="2", help="comma-separated intra-op thread counts")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="5 iterations, 2 warm-up, embedded + deit_tiny only")
    p.add_argument("--profile", action="store_true", help="profile every variant at the largest batch")
    p.add_argument("--markdown", default=None, help="write the table into this markdown file (between markers)")
    p.add_argument("--json", default=None, help="write the rows and the machine to this JSON file")
    p.add_argument("--keep", default=None, help="keep the exported models in this folder")
    p.add_argument("--reuse", action="store_true", help="with --keep: time the models already there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    if args.quick:
        args.iterations, args.warmup = min(args.iterations, 5), min(args.warmup, 2)
    models = (args.models or ("embedded,deit_tiny_patch16_224" if args.quick else
                              "embedded,deit_tiny_patch16_224,deit_small_patch16_224")).split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))

    rows, profiles = [], {}
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ort_latency_"))
    for name in models:
        workdir = root / name
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            paths, shape = build_variants(name, workdir, args)
        except Exception as e:  # e.g. the embedded model not installed: skip it, say so
            log.warning("skipping %s: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        # round-robin timing: on a shared machine every variant sees the same load
        makers = {v: (lambda b, t, path=paths[v]: OrtBackend(path, threads=t)) for v in VARIANTS}
        r = benchmark_interleaved(makers, shape, batch_sizes=batches, threads=threads, warmup=args.warmup,
                                  iterations=args.iterations)
        for row in r:
            row.update(model=name, size_mb=os.path.getsize(paths[row["label"]]) / 1e6)
        rows += sorted(r, key=lambda row: (row["threads"], VARIANTS.index(row["label"]), row["batch"]))
        if args.profile:
            for variant in VARIANTS:
                profiles[(name, variant)] = (max(batches), max(threads), profile_ops(
                    paths[variant], shape, batch=max(batches), threads=max(threads), runs=min(args.iterations, 10)))

    fp = {(r["model"], r["batch"], r["threads"]): r["median_ms"] for r in rows if r["label"] == "fp32"}
    head = f"{'model':<24} {'variant':<12} {'batch':>5} {'thr':>3} {'median ms':>10} {'p90 ms':>9} " \
           f"{'img/s':>9} {'vs fp32':>8} {'MB':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        speedup = fp[(r["model"], r["batch"], r["threads"])] / r["median_ms"]
        print(f"{r['model']:<24} {r['label']:<12} {r['batch']:>5} {r['threads']:>3} {r['median_ms']:>10.2f} "
              f"{r['p90_ms']:>9.2f} {r['throughput_ips']:>9.1f} {speedup:>7.2f}x {r['size_mb']:>7.2f}")
    for (name, variant), (_, _, ops) in profiles.items():
        total = sum(ms for _, ms in ops)
        print(f"\nprofile {name} {variant} (batch {max(batches)}, {max(threads)} threads): "
              f"{total:.1f} ms/run in kernels")
        for op, ms in ops[:8]:
            print(f"  {op:<28} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    info = machine()
    command = "python benchmarks/ort_latency.py " + " ".join(shlex.quote(a) for a in _timing_args(argv))
    print(f"\n{info['cpu']} ({info['family']}: {' '.join(info['flags'])}), onnxruntime {info['onnxruntime']}")
    if args.markdown:
        write_markdown(Path(args.markdown), markdown(rows, profiles, info, command))
        log.info("wrote the table into %s", args.markdown)
    if args.json:
        out = {"machine": info, "command": command, "rows": rows,
               "profiles": [{"model": m, "variant": v, "batch": b, "threads": t, "ops": ops}
                            for (m, v), (b, t, ops) in profiles.items()]}
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.json)
    if not args.keep:
        log.info("exported models were in %s (pass --keep DIR to keep them)", root)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
