#!/usr/bin/env python
"""Scaling of one MaskAQ calibration over processes: 1 plain process vs torchrun with N (gloo on CPU, nccl on CUDA).

    python benchmarks/distributed_scaling.py                               # embedded model, 1 vs 2 processes, CPU
    python benchmarks/distributed_scaling.py --model deit_tiny_patch16_224 --batch-size 4 --num-images 16 \
        --iterations 10 --ft-batch-size 4
    python benchmarks/distributed_scaling.py --model deit_small_patch16_224 --device cuda --procs 1,8

Every row is a real ``maskaq-deploy calibrate`` run (``python -m maskaq_deploy`` for one process, ``python -m
torch.distributed.run --nproc_per_node N`` otherwise) with the same config; the figures come from the stage
times the run records in its manifest (rank 0's clock, so they include the waits in the collectives):

* synthesis: image-iterations per second = images x iterations x rounds / synthesis seconds;
* fine-tune: image-steps per second = images x epochs / fine-tune seconds (each step: P and Q forward, Q
  backward, gradient all-reduce, SGD);
* wall: the whole command, process start and model loading included.

Models other than the embedded one have random weights (speed only). ``--threads`` is the torch thread count of
each process; the row "1 x T" with T = N x threads shows what the same cores give to one process. Run it on an
otherwise idle machine where possible: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _toml(args) -> str:
    model = f'name = "{args.model}"'
    if args.model != "embedded":
        model += '\nkwargs = {num_classes = 1000}'
    return f"""
[model]
{model}

[calibrate]
recipe = "{args.recipe}"
seed = 0
device = "{args.device}"

[dfq]
num_images = {args.num_images}
batch_size = {args.batch_size}
iterations = {args.iterations}
epochs = {args.epochs}
ft_batch_size = {args.ft_batch_size}
calib_batch_size = {args.batch_size}
q_init_images = {args.batch_size}
log_every = {max(args.iterations, 1)}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(nproc: int, threads: int, config: Path, out: Path) -> dict:
    cli = ["-m", "maskaq_deploy", "calibrate", "--config", str(config), "--out", str(out), "--quiet", "--force"]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{nproc}-process run failed:\n{res.stderr[-3000:]}")
    cal = json.loads((out / "manifest.json").read_text())["calibration"]
    return {"seconds": cal["seconds"], "rounds": cal["rounds"], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="'embedded' (default) or a timm model name")
    ap.add_argument("--recipe", default="w4a4")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="synthesis batch (the unit dealt to a process)")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-batch-size", type=int, default=16, help="global fine-tune batch")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per row, interleaved; the fastest counts (on a busy machine: less noise)")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(_toml(args))
        plan = [(n, args.threads) for n in procs]
        widest = max(procs) * args.threads
        if args.device == "cpu" and widest > args.threads:
            plan.append((1, widest))  # the same cores given to one process as threads
        best: dict[tuple[int, int], tuple[float, float, float]] = {}
        for _ in range(args.repeats):
            for n, t in plan:
                r = run_once(n, t, config, Path(tmp) / f"run_{n}x{t}")
                s = r["seconds"]
                synth = args.num_images * args.iterations * r["rounds"] / s["synthesis"] if s["synthesis"] else 0.0
                ft = args.num_images * args.epochs / s["finetune"] if s["finetune"] else 0.0
                old = best.get((n, t), (0.0, 0.0, float("inf")))
                best[(n, t)] = (max(old[0], synth), max(old[1], ft), min(old[2], r["wall"]))
        rows = [(n, t, *best[(n, t)]) for n, t in plan]
    load_after = os.getloadavg()

    base = next((r for r in rows if r[0] == 1 and r[1] == args.threads), rows[0])
    print(f"model {args.model}, recipe {args.recipe}, device {args.device}: {args.num_images} images, synthesis "
          f"batch {args.batch_size} x {args.iterations} iterations, fine-tune {args.epochs} epochs at global batch "
          f"{args.ft_batch_size}; best of {args.repeats}")
    print(f"{'procs x threads':>15} | {'synthesis img-it/s':>18} | {'speed-up':>8} | {'fine-tune img/s':>15} | "
          f"{'speed-up':>8} | {'wall s':>7}")
    for n, t, synth, ft, wall in rows:
        print(f"{f'{n} x {t}':>15} | {synth:18.1f} | {synth / base[2]:7.2f}x | {ft:15.1f} | "
              f"{(ft / base[3] if base[3] else 0):7.2f}x | {wall:7.1f}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
