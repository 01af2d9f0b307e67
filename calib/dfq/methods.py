"""The one entry point of data-free calibration: ``run_calibration``, the driver every method goes through.

A method is a registered source (calib.dfq.sources): it gives the images of each round and says which stages
it allows. The driver runs, for every method, the same stages in the same order:

1. images of round 0 from the source;
2. observer calibration of Q on them (checkpoint ``calibrated``);
3. block-wise reconstruction of Q against P on them, when the source allows it and ``recon_iters`` > 0
   (calib.dfq.reconstruct; checkpoint ``reconstructed`` after every unit);
4. fine-tuning, when the source allows it and ``epochs`` > 0, re-making the set with the current Q every
   ``refresh_every`` epochs for a source that refreshes (checkpoint ``finetune`` after every epoch).

Multi-process runs (``torchrun``; see calib.dfq.distributed and docs/distributed.md): synthesis is dealt out by
batch (calib.dfq.rounds); observer calibration and reconstruction run on every rank on the same set (cheap
next to synthesis) and rank 0's result is broadcast, so all ranks start fine-tuning bit-identical.
Fine-tuning is data-parallel (DistributedDataParallel over Q; see calib.dfq.finetune). Only rank 0 writes
files and reports progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from maskaq_deploy.calib.calibrate import calibrate_observers
from maskaq_deploy.calib.dfq import distributed
from maskaq_deploy.calib.dfq.config import DFQConfig
from maskaq_deploy.calib.dfq.distributed import DistContext
from maskaq_deploy.calib.dfq.errors import DFQConfigError, ResumeError
from maskaq_deploy.calib.dfq.finetune import finetune_epoch, holdout_kl, make_optimizer
from maskaq_deploy.calib.dfq.models import make_teacher, token_layout
from maskaq_deploy.calib.dfq.reconstruct import reconstruct, reconstruction_units
from maskaq_deploy.calib.dfq.run_context import RunContext, batches
from maskaq_deploy.calib.dfq.sources import data_free_methods, make_source
from maskaq_deploy.calib.dfq.state import RunState, model_fingerprint
from maskaq_deploy.calib.dfq.workers import resolve_workers
from maskaq_deploy.calib.quantize import iter_quantizers

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


def effective_config(method: str, config: DFQConfig) -> DFQConfig:
    """The config a method actually runs: the stages its source does not have are switched off."""
    return make_source(method).effective_config(config)


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


def run_calibration(fp_model: nn.Module, q_model: nn.Module, *, method: str, config: DFQConfig,
                    data_config: dict, run_dir, real_images: torch.Tensor | None = None,
                    real_labels: torch.Tensor | None = None, resume: bool = False, device="cpu",
                    progress: Progress | None = None, save_images: bool = False,
                    dist: DistContext | None = None, synthesis_workers: int | None = None) -> dict:
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

    ``synthesis_workers``: local processes that synthesize batches, one torch thread each (calib.dfq.workers);
    by default one per torch thread on a Linux CPU, 1 (in this process) on CUDA or in a multi-process run.
    """
    t_start = time.perf_counter()
    source = make_source(method)
    if source.needs_real_images and (real_images is None or len(real_images) == 0):
        raise DFQConfigError(f"method {method!r} needs real images (normalized [N, C, H, W]); pass real_images, "
                             f"or choose a data-free method ({', '.join(data_free_methods())})")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise DFQConfigError("device 'cuda' was requested but torch sees no CUDA device; use device='cpu'")
    dist = dist or distributed.setup(device)
    device = dist.device(device)
    synthesis_workers = resolve_workers(synthesis_workers, device, dist.enabled)
    # the stages this source has, and the TV weight for the recipe's bit widths
    cfg = source.effective_config(config).for_bit_widths(q.bits for _, q in iter_quantizers(q_model) if q.enabled)
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

    fp = {"method": method, "config": {k: v for k, v in cfg.to_dict().items() if k != "log_every"},
          "model": model_fingerprint(fp_model), "recipe": _recipe_fingerprint(q_model), "device": device.type,
          "input": [c, h, w], "normalization": [mean.tolist(), std.tolist()]}
    if source.needs_real_images:
        fp["real_images"] = _hash_tensor(real_images)
    # every rank must start from the same P, recipe and data (each loaded its own copy)
    dist.check_same({k: fp[k] for k in ("model", "recipe", "input", "normalization", "real_images") if k in fp},
                    "model, recipe or input")
    state = RunState(run_dir, fp, resume, dist)
    if state.resumed:
        log.info("resuming the %s run in %s", method, state.root)
    ctx = RunContext(method=method, cfg=cfg, teacher=teacher, q_model=q_model, layout=token_layout(teacher),
                     num_classes=_num_classes(teacher), input_size=(c, h, w), mean=mean, std=std, device=device,
                     autocast_dtype=autocast_dtype_for(cfg, device), dist=dist, state=state, emit=emit,
                     save_images=save_images, real_images=real_images, real_labels=real_labels,
                     synthesis_workers=synthesis_workers)
    source.start(ctx)

    # Optimizers are built after calibration, which replaces the weight quantizers' scale parameters.
    opt, ft_info = None, None
    if cfg.finetunes and state.resumed and state.has_model("finetune"):
        opt = make_optimizer(q_model, cfg)
        ft_info = state.load_model("finetune", q_model, opt)
    start_epoch = int(ft_info["epoch"]) if ft_info else 0
    if ft_info:  # the checkpoint holds the calibrated, reconstructed and partly fine-tuned Q
        ctx.record.curves["finetune"] = list(ft_info.get("curve", []))
        cur_round = start_epoch // cfg.finetune.refresh_every if cfg.finetune.refresh_every else 0
        images, labels = source.images(ctx, cur_round)
    else:
        cur_round = 0
        images, labels = source.images(ctx, 0)
        _calibrate(ctx, images)
        if cfg.reconstruction.iters:
            _reconstruct(ctx, images)
        opt = make_optimizer(q_model, cfg) if cfg.finetunes else None

    if cfg.finetunes:
        cur_round = _finetune(ctx, source, opt, images, labels, start_epoch, cur_round, ft_info)

    q_model.eval()
    state.mark(completed=True)
    rec = ctx.record
    rec.seconds["total"] = time.perf_counter() - t_start
    return {
        "method": method,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "device": device.type,
        "autocast": str(ctx.autocast_dtype).replace("torch.", "") if ctx.autocast_dtype else "off",
        "num_images": int(images.shape[0]),
        "rounds": cur_round + 1 if source.rounds() else 0,
        "resumed": state.resumed,
        "synthesis_workers": rec.synthesis_workers or synthesis_workers,  # as the last synthesis round ran
        "seconds": rec.seconds,
        "final_losses": rec.final,
        "curves": rec.curves,
        "paths": {"state": str(state.root), "images": rec.images},
        "config": cfg.to_dict(),
        **({"distributed": dist.describe()} if dist.enabled else {}),
    }


def _calibrate(ctx: RunContext, images: torch.Tensor) -> None:
    """Observer calibration of Q on ``images`` (or its checkpoint, when resuming)."""
    t0 = time.perf_counter()
    q_model, state = ctx.q_model, ctx.state
    info = state.load_model("calibrated", q_model) if state.resumed else None
    if info is None:
        ctx.emit({"stage": "calibration", "step": 0, "total": 1, "losses": {}})
        calibrate_observers(q_model, lambda m: [m(b) for b in batches(images, ctx.cfg.calibration.batch_size,
                                                                      ctx.device)])
        # every rank calibrated on the same set; rank 0's result makes them bit-identical on any hardware
        ctx.dist.broadcast_module(q_model, what="the calibrated model")
        state.save_model("calibrated", q_model)
    ctx.emit({"stage": "calibration", "step": 1, "total": 1, "losses": {}})
    ctx.record.seconds["calibration"] = time.perf_counter() - t0


def _reconstruct(ctx: RunContext, images: torch.Tensor) -> None:
    """Block-wise reconstruction, unit by unit, resuming after the last unit saved."""
    t0 = time.perf_counter()
    state, rec = ctx.state, ctx.record
    info = state.load_model("reconstructed", ctx.q_model) if state.resumed else None
    done = int(info["units_done"]) if info else 0
    curve = list(info.get("curve", [])) if info else []
    total = len(reconstruction_units(ctx.q_model))

    def after_unit(i: int, unit_info: dict) -> None:
        curve.append(unit_info)
        ctx.dist.broadcast_module(ctx.q_model, what=f"the reconstructed unit {unit_info['unit']}")
        state.save_model("reconstructed", ctx.q_model, info={"units_done": i + 1, "curve": curve})

    def on_log(step: int, n: int, losses: dict) -> None:
        ctx.emit({"stage": "reconstruction", "step": step, "total": n, "losses": losses})

    if done < total:
        reconstruct(ctx.teacher, ctx.q_model, images, ctx.cfg, ctx.device, start_unit=done,
                    after_unit=after_unit, on_log=on_log)
    rec.curves["reconstruction"] = curve
    if curve:
        rec.final["reconstruction"] = {k: sum(u[k] for u in curve) / len(curve)
                                       for k in ("mse_before", "mse_after")}
    rec.seconds["reconstruction"] = time.perf_counter() - t0


class _Judge:
    """The guard of a fine-tune (``ft_holdout``): held-out images of the first set, the KL of Q from P on them
    after every epoch, and a copy of the best Q so far (``finetune_best``; epoch 0 is Q before fine-tuning)."""

    def __init__(self, ctx: RunContext, history: list[float]):
        self.ctx, self.history = ctx, list(history)  # history[e]: the judgement after e epochs

    def hold_out(self, first_set: torch.Tensor, resumed: bool) -> None:
        """The last ``ft_holdout`` of the first set, kept (on disk too) after later rounds replace that set."""
        if resumed:
            saved = self.ctx.state.load_tensors("holdout")
            if saved is None:
                raise ResumeError("the fine-tune's held-out images are missing from the run; rerun without `resume`")
            self.images = saved["images"]
        else:
            self.images = first_set[-round(first_set.shape[0] * self.ctx.cfg.finetune.holdout):].float()
            self.ctx.state.save_tensors("holdout", {"images": self.images})

    def training_part(self, images, labels):
        """The first set without its held-out images."""
        n = self.images.shape[0]
        return images[:-n], (labels[:-n] if labels is not None else None)

    def judge(self, epoch: int) -> float:
        ctx = self.ctx
        kl = holdout_kl(ctx.teacher, ctx.q_model, self.images, ctx.cfg, ctx.device, ctx.autocast_dtype)
        if not self.history or kl < min(self.history):
            ctx.state.save_model("finetune_best", ctx.q_model, info={"epoch": epoch, "holdout_kl": kl})
        self.history.append(kl)
        return kl

    @property
    def best_epoch(self) -> int:
        return min(range(len(self.history)), key=self.history.__getitem__)

    def stalled(self) -> bool:
        patience = self.ctx.cfg.finetune.patience
        return bool(patience) and len(self.history) - 1 - self.best_epoch >= patience

    def keep_best(self) -> int:
        """Restore the best Q (unless it is the current one); returns its epoch."""
        best = self.best_epoch
        if best != len(self.history) - 1:
            self.ctx.state.load_model("finetune_best", self.ctx.q_model)
        return best


def _finetune(ctx: RunContext, source, opt, images, labels, start_epoch: int, cur_round: int,
              ft_info: dict | None) -> int:
    """Fine-tune epochs ``start_epoch ...``, re-making the set when the source refreshes; returns the round.
    With ``ft_holdout`` the fine-tune is guarded (``_Judge``): it ends with the best epoch's Q, and stops after
    ``ft_patience`` epochs without improvement."""
    cfg, dist, rec = ctx.cfg, ctx.dist, ctx.record
    judge = _Judge(ctx, (ft_info or {}).get("holdout_kl", [])) if cfg.finetune.holdout else None
    if judge is not None:
        judge.hold_out(images, resumed=bool(ft_info))
        if cur_round == 0:
            images, labels = judge.training_part(images, labels)
        if not judge.history:
            judge.judge(0)
    # Data-parallel Q for the fine-tune steps; synthesis (refresh) keeps using the plain module, whose
    # parameters the wrapper shares.
    train_q = dist.wrap_ddp(ctx.q_model, images[:1].to(ctx.device).float())
    for epoch in range(start_epoch, cfg.finetune.epochs):
        if judge is not None and judge.stalled():
            log.info("fine-tune stopped after epoch %d: no better held-out KL for %d epochs", epoch,
                     cfg.finetune.patience)
            break
        rnd = epoch // cfg.finetune.refresh_every if cfg.finetune.refresh_every else 0
        if rnd != cur_round:
            images, labels = source.images(ctx, rnd)
            cur_round = rnd
        t0 = time.perf_counter()

        def on_log(step, total, losses, epoch=epoch):
            ctx.emit({"stage": "finetune", "epoch": epoch, "step": step + 1, "total": total, "losses": losses})

        losses = finetune_epoch(ctx.teacher, train_q, opt, images, labels, cfg, ctx.layout, epoch, ctx.device,
                                ctx.autocast_dtype, on_log, dist=dist)
        if judge is not None:
            losses["holdout_kl"] = judge.judge(epoch + 1)
        rec.curves["finetune"].append({"epoch": epoch, **losses})
        ctx.state.save_model("finetune", ctx.q_model, opt, {"epoch": epoch + 1, "curve": rec.curves["finetune"],
                                                            **({"holdout_kl": judge.history} if judge else {})})
        rec.seconds["finetune"] += time.perf_counter() - t0
        log.info("fine-tune epoch %d/%d: %s", epoch + 1, cfg.finetune.epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    if rec.curves["finetune"]:
        rec.final["finetune"] = {k: v for k, v in rec.curves["finetune"][-1].items() if k != "epoch"}
    if judge is not None:
        kept = judge.keep_best()
        rec.final.setdefault("finetune", {}).update(kept_epoch=kept, kept_holdout_kl=judge.history[kept])
    return cur_round
