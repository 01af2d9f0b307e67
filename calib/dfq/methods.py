"""The one entry point of data-free calibration: ``run_calibration``.

Methods (all through the same synthesis loop, calibration and fine-tuning code):

* ``maskaq``: MaskAQ synthesis (P and Q in the loop), observer calibration, then -- when the config has
  epochs -- fine-tuning of Q with the set re-synthesized by the current Q every ``refresh_every`` epochs.
* ``psaq``: PSAQ-ViT synthesis (KDE patch-similarity entropy + CE + TV, Q not used), calibration only.
* ``noise``: N(0, 1) images in normalized space, calibration only.
* ``real``: the caller's images (a seeded subset of ``num_images``), calibration, and fine-tuning when the
  config has epochs (no refresh: there is nothing to re-synthesize).

Multi-process runs (``torchrun``; see calib.dfq.distributed and docs/distributed.md). The unit of work is a
synthesis batch: batch ``b`` holds images ``b * batch_size ...`` with labels drawn once per round for the whole
set and its own seed ``derive_seed(seed, "synth", method, round, b, attempt)``, so a batch's pixels depend only
on the global seed and its index, never on which process made it or how many there are. Missing batches are
dealt round-robin to the ranks in waves (with nothing saved yet, rank r makes every batch with
``b % world == r``); after each wave every batch is broadcast from the rank that made it, so every rank holds the
whole set in batch order, and rank 0 saves the wave. Observer calibration then runs on every rank on that same
set (cheap next to synthesis) and rank 0's result is broadcast, so all ranks start fine-tuning bit-identical.
Fine-tuning is data-parallel (DistributedDataParallel over Q; see calib.dfq.finetune); a refresh is the same
collective synthesis with the current Q. Only rank 0 writes files and reports progress.

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

from maskaq_deploy.calib.calibrate import calibrate_observers
from maskaq_deploy.calib.dfq import distributed
from maskaq_deploy.calib.dfq.config import METHODS, DFQConfig
from maskaq_deploy.calib.dfq.distributed import DistContext
from maskaq_deploy.calib.dfq.errors import DFQConfigError, SynthesisError
from maskaq_deploy.calib.dfq.finetune import finetune_epoch, make_optimizer
from maskaq_deploy.calib.dfq.images import save_image_grid
from maskaq_deploy.calib.dfq.models import make_teacher, token_layout
from maskaq_deploy.calib.dfq.state import RunState, derive_seed, model_fingerprint
from maskaq_deploy.calib.dfq.synthesis import SynthesisSetup, synthesize_batch
from maskaq_deploy.calib.quantize import iter_quantizers

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


def autocast_dtype_for(cfg: DFQConfig, device: torch.device):
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
    from maskaq_deploy.calib.checkpoint import quantizer_spec

    specs = {name: quantizer_spec(q) for name, q in iter_quantizers(q_model)}
    return hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:16]


def _batches(images: torch.Tensor, size: int, device):
    for i in range(0, images.shape[0], size):
        yield images[i:i + size].to(device).float()


def run_calibration(fp_model: nn.Module, q_model: nn.Module, *, method: str, config: DFQConfig,
                    data_config: dict, run_dir, real_images: torch.Tensor | None = None,
                    real_labels: torch.Tensor | None = None, resume: bool = False, device="cpu",
                    progress: Progress | None = None, save_images: bool = False,
                    dist: DistContext | None = None) -> dict:
    """Calibrate (and, when the config says so, fine-tune) ``q_model`` in place with ``method``.

    ``fp_model``: the float model (never modified). ``q_model``: the same model with quantizers attached,
    activation quantizers not yet calibrated; on return it is calibrated / fine-tuned, in eval mode, on
    ``device``. ``data_config``: ``mean``, ``std`` (per channel or scalar) and ``input_size`` (C, H, W) of the
    model's normalized input. ``real_images``: normalized float tensor [N, C, H, W] (method ``real``).
    State goes to ``run_dir/dfq``; ``resume=True`` continues an interrupted run with the same settings and
    gives the same result as an uninterrupted one. ``progress`` receives dicts
    ``{"stage", "step", "total", "losses", ...}``. Returns a JSON-serializable summary.

    ``dist``: the process's place in a multi-process run; by default the process group the launcher's
    environment describes (``distributed.setup``), or a single process when there is none. In a multi-process
    run every rank calls this with the same arguments; only rank 0 writes ``run_dir`` and receives ``progress``
    events, and every rank returns with the same ``q_model``.
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise DFQConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "real" and (real_images is None or len(real_images) == 0):
        raise DFQConfigError("method 'real' needs real images (normalized [N, C, H, W]); pass real_images, "
                             "or choose a data-free method (maskaq, psaq, noise)")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DFQConfigError("device 'cuda' was requested but torch sees no CUDA device; use device='cpu'")
    dist = dist or distributed.setup(device)
    device = dist.device(device)
    cfg = effective_config(method, config)
    # progress is drawn by rank 0 only: the other ranks would repeat the same bars
    emit = progress if progress is not None and dist.is_main else (lambda event: None)

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
    autocast_dtype = autocast_dtype_for(cfg, device)

    fp = {"method": method, "config": {k: v for k, v in cfg.to_dict().items() if k != "log_every"},
          "model": model_fingerprint(fp_model), "recipe": _recipe_fingerprint(q_model), "device": device.type,
          "input": [c, h, w], "normalization": [mean.tolist(), std.tolist()]}
    if method == "real":
        fp["real_images"] = _hash_tensor(real_images)
    # every rank must start from the same P, recipe and data (each loaded its own copy)
    dist.check_same({k: fp[k] for k in ("model", "recipe", "input", "normalization", "real_images") if k in fp},
                    "model, recipe or input")
    state = RunState(run_dir, fp, resume, dist)
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

    def saved_batches(rnd: int, labels_of) -> dict[int, tuple[torch.Tensor, dict]]:
        """The batches of round ``rnd`` already saved (resume), on every rank: rank 0 reads, then broadcasts."""
        found = {}
        for b in range(num_batches):
            loaded = state.load_batch(rnd, b)
            if loaded is not None and torch.equal(loaded[1], labels_of(b)):
                found[b] = (loaded[0], loaded[2])
        if not dist.enabled:
            return found
        infos = dist.broadcast_object({b: info for b, (_, info) in found.items()}, 0, "saved synthesis batches")
        return {b: (dist.broadcast_tensor(found[b][0] if dist.is_main else
                                          torch.empty((len(labels_of(b)), c, h, w), dtype=torch.float16), 0,
                                          f"broadcast of saved synthesis batch {b}"), infos[b])
                for b in sorted(infos)}

    def synthesize_one(rnd: int, b: int, lbl: torch.Tensor, on_log) -> tuple[torch.Tensor, dict]:
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
        return x.half(), {"final": last, "curve": curve if b == 0 else [], "attempts": attempt + 1}

    def synthesize_round(rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        labels_all = round_labels(rnd)
        total = num_batches * cfg.iterations

        def labels_of(b: int) -> torch.Tensor:
            return labels_all[b * cfg.batch_size:(b + 1) * cfg.batch_size]

        done = saved_batches(rnd, labels_of)
        for i, b in enumerate(sorted(done)):
            emit({"stage": "synthesis", "round": rnd, "batch": b, "step": (i + 1) * cfg.iterations, "total": total,
                  "losses": done[b][1].get("final", {})})
        missing = [b for b in range(num_batches) if b not in done]
        if (missing and method == "maskaq" and rnd == 0 and not q_ready["done"] and setup.student is not None
                and cfg.w_mask > 0):
            init_q_on_noise()  # on every rank: the same deterministic Q for the whole round
        # Waves of ``world`` batches, dealt round-robin; one process makes one batch per wave.
        for start in range(0, len(missing), dist.world_size):
            wave = missing[start:start + dist.world_size]
            base = len(done) * cfg.iterations
            mine = wave[dist.rank] if dist.rank < len(wave) else None
            made = None
            if mine is not None:
                def on_log(step, losses, b=mine, n=len(wave), base=base):
                    emit({"stage": "synthesis", "round": rnd, "batch": b, "step": base + (step + 1) * n,
                          "total": total, "losses": losses})

                made = synthesize_one(rnd, mine, labels_of(mine), on_log)
            for j, b in enumerate(wave):
                if dist.enabled:  # every rank receives every batch of the wave from the rank that made it
                    imgs = dist.broadcast_tensor(made[0] if j == dist.rank else torch.empty(
                        (len(labels_of(b)), c, h, w), dtype=torch.float16), j, f"broadcast of synthesis batch {b}")
                    info = dist.broadcast_object(made[1] if j == dist.rank else None, j,
                                                 f"broadcast of synthesis batch {b}")
                else:
                    imgs, info = made
                state.save_batch(rnd, b, imgs, labels_of(b), info)
                done[b] = (imgs, info)
                if j == len(wave) - 1:  # one event per wave keeps the bar monotonic
                    emit({"stage": "synthesis", "round": rnd, "batch": b, "step": len(done) * cfg.iterations,
                          "total": total, "losses": info.get("final", {})})
        state.drop_rounds_before(rnd)
        finals = [done[b][1].get("final", {}) for b in range(num_batches)]
        curves["synthesis"].append({"round": rnd, "curve": done[0][1].get("curve", [])})
        keys = sorted({k for f in finals for k in f})
        final["synthesis"] = {k: sum(f.get(k, 0.0) for f in finals) / len(finals) for k in keys}
        seconds["synthesis"] += time.perf_counter() - t0
        images = torch.cat([done[b][0] for b in range(num_batches)])
        if save_images and dist.is_main:
            p = save_image_grid(images, state.root / f"images_round{rnd:03d}.png", mean, std)
            paths["images"].append(str(p))
        return images, torch.cat([labels_of(b) for b in range(num_batches)])

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
            if save_images and dist.is_main:
                paths["images"].append(str(save_image_grid(imgs, state.root / "images_real.png", mean, std)))
            return imgs, lbls
        else:
            return synthesize_round(0)
        if save_images and dist.is_main:
            paths["images"].append(str(save_image_grid(imgs, state.root / f"images_{method}.png", mean, std)))
        return imgs, None

    # --- fine-tune checkpoint (resume point after calibration)
    # Optimizers are built after calibration, which replaces the weight quantizers' scale parameters.
    opt, ft_info = None, None
    if cfg.finetunes and state.resumed and state.has_model("finetune"):
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
            # every rank calibrated on the same set; rank 0's result makes them bit-identical on any hardware
            dist.broadcast_module(q_model, what="the calibrated model")
            state.save_model("calibrated", q_model)
        emit({"stage": "calibration", "step": 1, "total": 1, "losses": {}})
        seconds["calibration"] = time.perf_counter() - t0
        opt = make_optimizer(q_model, cfg) if cfg.finetunes else None

    if cfg.finetunes:
        # Data-parallel Q for the fine-tune steps; synthesis (refresh) keeps using the plain module, whose
        # parameters the wrapper shares.
        train_q = dist.wrap_ddp(q_model, images[:1].to(device).float())
        for epoch in range(start_epoch, cfg.epochs):
            rnd = epoch // cfg.refresh_every if cfg.refresh_every else 0
            if rnd != cur_round:
                images, labels = synthesize_round(rnd)
                cur_round = rnd
            t0 = time.perf_counter()

            def on_log(step, total, losses, epoch=epoch):
                emit({"stage": "finetune", "epoch": epoch, "step": step + 1, "total": total, "losses": losses})

            losses = finetune_epoch(teacher, train_q, opt, images, labels, cfg, layout, epoch, device,
                                    autocast_dtype, on_log, dist=dist)
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
        **({"distributed": dist.describe()} if dist.enabled else {}),
    }
