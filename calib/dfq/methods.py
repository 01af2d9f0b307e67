"""The one entry point of data-free calibration: ``run_calibration``.

Methods (all through the same synthesis loop, calibration and fine-tuning code):

* ``maskaq``: MaskAQ synthesis (P and Q in the loop), observer calibration, then -- when the config has
  epochs -- fine-tuning of Q with the set re-synthesized by the current Q every ``refresh_every`` epochs.
* ``psaq``: PSAQ-ViT synthesis (KDE patch-similarity entropy + CE + TV, Q not used), calibration only.
* ``noise``: N(0, 1) images in normalized space, calibration only.
* ``real``: the caller's images (a seeded subset of ``num_images``), calibration, and fine-tuning when the
  config has epochs (no refresh: there is nothing to re-synthesize).

Choice for Q's LSQ step sizes before MaskAQ first runs Q (``q_init = "noise"``): Q's observers are
calibrated on ``q_init_images`` N(0, 1) images, as the reference effectively does (its LSQ initializes on
the first, pure-noise synthesis iteration). The final calibration on the finished synthetic set then
re-derives every range, so the noise initialization only steers the mask-alignment term of the first round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from calib.calibrate import calibrate_observers
from calib.dfq.config import METHODS, DFQConfig
from calib.dfq.errors import DFQConfigError, SynthesisError
from calib.dfq.finetune import finetune_epoch, make_optimizer
from calib.dfq.images import save_image_grid
from calib.dfq.models import make_teacher, token_layout
from calib.dfq.state import RunState, derive_seed, model_fingerprint
from calib.dfq.synthesis import SynthesisSetup, synthesize_batch
from calib.quantize import iter_quantizers

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
MAX_ATTEMPTS = 3


def effective_config(method: str, config: DFQConfig) -> DFQConfig:
    """The config a method actually runs: noise and psaq are calibration-only; real never refreshes."""
    if method in ("noise", "psaq"):
        return config.replace(epochs=0, refresh_every=0)
    if method == "real":
        return config.replace(refresh_every=0)
    return config


def _autocast_dtype(cfg: DFQConfig, device: torch.device):
    if cfg.autocast == "off" or (cfg.autocast == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int) or n < 1:
        raise DFQConfigError("the model has no classifier (num_classes); data-free synthesis needs class "
                             "targets: create it with num_classes > 0")
    return n


def _hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _recipe_fingerprint(q_model: nn.Module) -> str:
    from calib.checkpoint import quantizer_spec

    specs = {name: quantizer_spec(q) for name, q in iter_quantizers(q_model)}
    return hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:16]


def _batches(images: torch.Tensor, size: int, device):
    for i in range(0, images.shape[0], size):
        yield images[i:i + size].to(device).float()


def run_calibration(fp_model: nn.Module, q_model: nn.Module, *, method: str, config: DFQConfig,
                    data_config: dict, run_dir, real_images: torch.Tensor | None = None,
                    real_labels: torch.Tensor | None = None, resume: bool = False, device="cpu",
                    progress: Progress | None = None, save_images: bool = False) -> dict:
    """Calibrate (and, when the config says so, fine-tune) ``q_model`` in place with ``method``.

    ``fp_model``: the float model (never modified). ``q_model``: the same model with quantizers attached,
    activation quantizers not yet calibrated; on return it is calibrated / fine-tuned, in eval mode, on
    ``device``. ``data_config``: ``mean``, ``std`` (per channel or scalar) and ``input_size`` (C, H, W) of the
    model's normalized input. ``real_images``: normalized float tensor [N, C, H, W] (method ``real``).
    State goes to ``run_dir/dfq``; ``resume=True`` continues an interrupted run with the same settings and
    gives the same result as an uninterrupted one. ``progress`` receives dicts
    ``{"stage", "step", "total", "losses", ...}``. Returns a JSON-serializable summary.
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise DFQConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "real" and (real_images is None or len(real_images) == 0):
        raise DFQConfigError("method 'real' needs real images (normalized [N, C, H, W]); pass real_images, "
                             "or choose a data-free method (maskaq, psaq, noise)")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DFQConfigError("device 'cuda' was requested but torch sees no CUDA device; use device='cpu'")
    cfg = effective_config(method, config)
    emit = progress or (lambda event: None)

    c, h, w = (int(v) for v in data_config["input_size"])
    mean = torch.as_tensor(data_config["mean"], dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(data_config["std"], dtype=torch.float32).reshape(-1)
    if mean.numel() == 1:
        mean, std = mean.expand(c), std.expand(c)
    if mean.numel() != c or std.numel() != c:
        raise DFQConfigError(f"data_config mean/std have {mean.numel()}/{std.numel()} values for {c} channels")
    if real_images is not None and tuple(real_images.shape[1:]) != (c, h, w):
        raise DFQConfigError(f"real images have shape {tuple(real_images.shape[1:])}, the model takes "
                             f"{(c, h, w)}; resize / normalize them to the model's input first")

    q_model.to(device).eval()
    teacher = make_teacher(fp_model, q_model).to(device)
    layout = token_layout(teacher)
    num_classes = _num_classes(teacher)
    autocast_dtype = _autocast_dtype(cfg, device)

    fp = {"method": method, "config": {k: v for k, v in cfg.to_dict().items() if k != "log_every"},
          "model": model_fingerprint(fp_model), "recipe": _recipe_fingerprint(q_model), "device": device.type,
          "input": [c, h, w], "normalization": [mean.tolist(), std.tolist()]}
    if method == "real":
        fp["real_images"] = _hash_tensor(real_images)
    state = RunState(run_dir, fp, resume)
    if state.resumed:
        log.info("resuming the %s run in %s", method, state.root)

    seconds = {"synthesis": 0.0, "calibration": 0.0, "finetune": 0.0}
    curves: dict[str, list] = {"synthesis": [], "finetune": []}
    final: dict[str, dict] = {}
    paths: dict[str, object] = {"state": str(state.root), "images": []}

    setup = SynthesisSetup(teacher=teacher, student=q_model if method == "maskaq" else None, layout=layout,
                           cfg=cfg, method=method, device=device, input_size=(c, h, w),
                           mean=mean.reshape(1, c, 1, 1).to(device), std=std.reshape(1, c, 1, 1).to(device),
                           autocast_dtype=autocast_dtype)
    num_batches = math.ceil(cfg.num_images / cfg.batch_size)

    def round_labels(rnd: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "labels", rnd))
        if cfg.balanced_labels:
            base = torch.arange(cfg.num_images) % num_classes
            return base[torch.randperm(cfg.num_images, generator=g)]
        return torch.randint(0, num_classes, (cfg.num_images,), generator=g)

    q_ready = {"done": False}

    def init_q_on_noise() -> None:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "q_init"))
        noise = torch.randn((cfg.q_init_images, c, h, w), generator=g)
        calibrate_observers(q_model, lambda m: [m(b) for b in _batches(noise, cfg.calib_batch_size, device)])
        q_ready["done"] = True

    def synthesize_round(rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        labels_all = round_labels(rnd)
        imgs_out, lbls_out, finals = [], [], []
        total = num_batches * cfg.iterations
        for b in range(num_batches):
            lbl = labels_all[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            loaded = state.load_batch(rnd, b)
            if loaded is not None and torch.equal(loaded[1], lbl):
                imgs, _, info = loaded
            else:
                if (method == "maskaq" and rnd == 0 and not q_ready["done"] and setup.student is not None
                        and cfg.w_mask > 0):
                    init_q_on_noise()

                def on_log(step, losses, b=b):
                    emit({"stage": "synthesis", "round": rnd, "batch": b, "step": b * cfg.iterations + step + 1,
                          "total": total, "losses": losses})

                for attempt in range(MAX_ATTEMPTS):
                    seed = derive_seed(cfg.seed, "synth", method, rnd, b, attempt)
                    x, last, curve = synthesize_batch(setup, lbl, seed, on_log)
                    if torch.isfinite(x).all():
                        break
                    log.warning("synthesis batch %d of round %d diverged (non-finite pixels); retrying", b, rnd)
                else:
                    raise SynthesisError(f"synthesis diverged {MAX_ATTEMPTS} times on batch {b}; lower the "
                                         "learning rate (lr) or the loss weights")
                # The set is kept in float16 (half the memory and disk); runs and resumed runs use the same
                # rounded values, so resuming stays exact.
                imgs = x.half()
                info = {"final": last, "curve": curve if b == 0 else [], "attempts": attempt + 1}
                state.save_batch(rnd, b, imgs, lbl, info)
            emit({"stage": "synthesis", "round": rnd, "batch": b, "step": (b + 1) * cfg.iterations,
                  "total": total, "losses": info.get("final", {})})
            imgs_out.append(imgs)
            lbls_out.append(lbl)
            finals.append(info.get("final", {}))
            if b == 0:
                curves["synthesis"].append({"round": rnd, "curve": info.get("curve", [])})
        state.drop_rounds_before(rnd)
        keys = sorted({k for f in finals for k in f})
        final["synthesis"] = {k: sum(f.get(k, 0.0) for f in finals) / len(finals) for k in keys}
        seconds["synthesis"] += time.perf_counter() - t0
        images = torch.cat(imgs_out)
        if save_images:
            p = save_image_grid(images, state.root / f"images_round{rnd:03d}.png", mean, std)
            paths["images"].append(str(p))
        return images, torch.cat(lbls_out)

    def calibration_set() -> tuple[torch.Tensor, torch.Tensor | None]:
        if method == "noise":
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "noise"))
            imgs = torch.randn((cfg.num_images, c, h, w), generator=g)
        elif method == "real":
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "real"))
            n = min(cfg.num_images, real_images.shape[0])
            idx = torch.randperm(real_images.shape[0], generator=g)[:n]
            imgs = real_images[idx].float()
            lbls = real_labels[idx].long() if real_labels is not None else None
            if save_images:
                paths["images"].append(str(save_image_grid(imgs, state.root / "images_real.png", mean, std)))
            return imgs, lbls
        else:
            return synthesize_round(0)
        if save_images:
            paths["images"].append(str(save_image_grid(imgs, state.root / f"images_{method}.png", mean, std)))
        return imgs, None

    # --- fine-tune checkpoint (resume point after calibration)
    # Optimizers are built after calibration, which replaces the weight quantizers' scale parameters.
    opt, ft_info = None, None
    if cfg.finetunes and state.resumed and (state.root / "finetune.safetensors").is_file():
        opt = make_optimizer(q_model, cfg)
        ft_info = state.load_model("finetune", q_model, opt)
    start_epoch = int(ft_info["epoch"]) if ft_info else 0
    if ft_info:
        curves["finetune"] = list(ft_info.get("curve", []))
        cur_round = start_epoch // cfg.refresh_every if cfg.refresh_every else 0
        images, labels = calibration_set() if method != "maskaq" else synthesize_round(cur_round)
    else:
        cur_round = 0
        images, labels = calibration_set()
        t0 = time.perf_counter()
        info = state.load_model("calibrated", q_model) if state.resumed else None
        if info is None:
            emit({"stage": "calibration", "step": 0, "total": 1, "losses": {}})
            calibrate_observers(q_model, lambda m: [m(b) for b in _batches(images, cfg.calib_batch_size, device)])
            state.save_model("calibrated", q_model)
        emit({"stage": "calibration", "step": 1, "total": 1, "losses": {}})
        seconds["calibration"] = time.perf_counter() - t0
        opt = make_optimizer(q_model, cfg) if cfg.finetunes else None

    if cfg.finetunes:
        for epoch in range(start_epoch, cfg.epochs):
            rnd = epoch // cfg.refresh_every if cfg.refresh_every else 0
            if rnd != cur_round:
                images, labels = synthesize_round(rnd)
                cur_round = rnd
            t0 = time.perf_counter()

            def on_log(step, total, losses, epoch=epoch):
                emit({"stage": "finetune", "epoch": epoch, "step": step + 1, "total": total, "losses": losses})

            losses = finetune_epoch(teacher, q_model, opt, images, labels, cfg, layout, epoch, device,
                                    autocast_dtype, on_log)
            curves["finetune"].append({"epoch": epoch, **losses})
            state.save_model("finetune", q_model, opt, {"epoch": epoch + 1, "curve": curves["finetune"]})
            seconds["finetune"] += time.perf_counter() - t0
            log.info("fine-tune epoch %d/%d: %s", epoch + 1, cfg.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if curves["finetune"]:
            final["finetune"] = {k: v for k, v in curves["finetune"][-1].items() if k != "epoch"}

    q_model.eval()
    state.mark(completed=True)
    seconds["total"] = time.perf_counter() - t_start
    return {
        "method": method,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "device": device.type,
        "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "off",
        "num_images": int(images.shape[0]),
        "rounds": cur_round + 1 if method == "maskaq" else (1 if method == "psaq" else 0),
        "resumed": state.resumed,
        "seconds": seconds,
        "final_losses": final,
        "curves": curves,
        "paths": paths,
        "config": cfg.to_dict(),
    }
