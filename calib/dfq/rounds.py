"""Synthesis rounds: make (or reload) a whole synthetic set, batch by batch, resumable and multi-process.

The unit of work is a synthesis batch: batch ``b`` holds images ``b * batch_size ...`` with labels drawn once per
round for the whole set and its own seed ``derive_seed(seed, "synth", method, round, b, attempt)``, so a batch's
pixels depend only on the global seed and its index, never on which process made it or how many there are.
Missing batches are dealt round-robin to the ranks in waves (with nothing saved yet, rank r makes every batch
with ``b % world == r``); after each wave every batch is broadcast from the rank that made it, so every rank
holds the whole set in batch order, and rank 0 saves the wave. In one process on a multi-core CPU the missing
batches go to local one-thread worker processes instead (calib.dfq.workers), saved as each one arrives.

Choice for Q's LSQ step sizes before MaskAQ first runs Q: Q's observers are calibrated on
``q_init_images`` N(0, 1) images, as the reference effectively does (its LSQ initializes on the first,
pure-noise synthesis iteration). The final calibration on the finished synthetic set then re-derives every
range, so the noise initialization only steers the mask-alignment term of the first round.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from maskaq_deploy.calib.calibrate import calibrate_observers
from maskaq_deploy.calib.dfq.errors import SynthesisError
from maskaq_deploy.calib.dfq.images import save_image_grid
from maskaq_deploy.calib.dfq.run_context import RunContext, batches
from maskaq_deploy.calib.dfq.state import derive_seed
from maskaq_deploy.calib.dfq.synthesis import SynthesisSetup, synthesize_batch
from maskaq_deploy.calib.dfq.workers import WorkersUnavailable, make_in_workers, one_thread, workers_that_fit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class SynthesisRounds:
    """The synthetic sets of one run: ``make(rnd)`` returns round ``rnd``'s (images float16, labels)."""

    def __init__(self, ctx: RunContext, method: str, use_student: bool):
        self.ctx = ctx
        self.method = method
        cfg = ctx.cfg
        c, h, w = ctx.input_size
        self.setup = SynthesisSetup(teacher=ctx.teacher, student=ctx.q_model if use_student else None,
                                    layout=ctx.layout, cfg=cfg, method=method, device=ctx.device,
                                    input_size=(c, h, w), mean=ctx.mean.reshape(1, c, 1, 1).to(ctx.device),
                                    std=ctx.std.reshape(1, c, 1, 1).to(ctx.device),
                                    autocast_dtype=ctx.autocast_dtype)
        self.num_batches = math.ceil(cfg.num_images / cfg.batch_size)
        self.q_ready = False
        self.rounds_made = 0

    def labels(self, rnd: int) -> torch.Tensor:
        cfg = self.ctx.cfg
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "labels", rnd))
        if cfg.synthesis.balanced_labels:
            base = torch.arange(cfg.num_images) % self.ctx.num_classes
            return base[torch.randperm(cfg.num_images, generator=g)]
        return torch.randint(0, self.ctx.num_classes, (cfg.num_images,), generator=g)

    def _init_q_on_noise(self) -> None:
        ctx = self.ctx
        g = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "q_init"))
        noise = torch.randn((ctx.cfg.maskaq.q_init_images, *ctx.input_size), generator=g)
        calibrate_observers(ctx.q_model, lambda m: [m(b) for b in batches(noise, ctx.cfg.calibration.batch_size,
                                                                           ctx.device)])
        self.q_ready = True

    def _saved(self, rnd: int, labels_of) -> dict[int, tuple[torch.Tensor, dict]]:
        """The batches of round ``rnd`` already saved (resume), on every rank: rank 0 reads, then broadcasts."""
        ctx, dist = self.ctx, self.ctx.dist
        found = {}
        for b in range(self.num_batches):
            loaded = ctx.state.load_batch(rnd, b)
            if loaded is not None and torch.equal(loaded[1], labels_of(b)):
                found[b] = (loaded[0], loaded[2])
        if not dist.enabled:
            return found
        infos = dist.broadcast_object({b: info for b, (_, info) in found.items()}, 0, "saved synthesis batches")
        return {b: (dist.broadcast_tensor(found[b][0] if dist.is_main else
                                          torch.empty((len(labels_of(b)), *ctx.input_size), dtype=torch.float16),
                                          0, f"broadcast of saved synthesis batch {b}"), infos[b])
                for b in sorted(infos)}

    def _one(self, rnd: int, b: int, lbl: torch.Tensor, on_log) -> tuple[torch.Tensor, dict]:
        for attempt in range(MAX_ATTEMPTS):
            seed = derive_seed(self.ctx.cfg.seed, "synth", self.method, rnd, b, attempt)
            x, last, curve = synthesize_batch(self.setup, lbl, seed, on_log)
            if torch.isfinite(x).all():
                break
            log.warning("synthesis batch %d of round %d diverged (non-finite pixels); retrying", b, rnd)
        else:
            raise SynthesisError(f"synthesis diverged {MAX_ATTEMPTS} times on batch {b}; lower the "
                                 "learning rate (lr) or the loss weights")
        # The set is kept in float16 (half the memory and disk); runs and resumed runs use the same
        # rounded values, so resuming stays exact.
        return x.half(), {"final": last, "curve": curve if b == 0 else [], "attempts": attempt + 1}

    def _make_in_waves(self, rnd, missing, labels_of, done, total) -> None:
        """In this process (and, in a torchrun job, its peers): waves of ``world`` batches dealt round-robin."""
        ctx, cfg, dist = self.ctx, self.ctx.cfg, self.ctx.dist
        # Waves of ``world`` batches, dealt round-robin; one process makes one batch per wave.
        for start in range(0, len(missing), dist.world_size):
            wave = missing[start:start + dist.world_size]
            base = len(done) * cfg.synthesis.iterations
            mine = wave[dist.rank] if dist.rank < len(wave) else None
            made = None
            if mine is not None:
                def on_log(step, losses, b=mine, n=len(wave), base=base):
                    ctx.emit({"stage": "synthesis", "round": rnd, "batch": b, "step": base + (step + 1) * n,
                              "total": total, "losses": losses})

                made = self._one(rnd, mine, labels_of(mine), on_log)
            for j, b in enumerate(wave):
                if dist.enabled:  # every rank receives every batch of the wave from the rank that made it
                    imgs = dist.broadcast_tensor(made[0] if j == dist.rank else torch.empty(
                        (len(labels_of(b)), *ctx.input_size), dtype=torch.float16), j,
                        f"broadcast of synthesis batch {b}")
                    info = dist.broadcast_object(made[1] if j == dist.rank else None, j,
                                                 f"broadcast of synthesis batch {b}")
                else:
                    imgs, info = made
                ctx.state.save_batch(rnd, b, imgs, labels_of(b), info)
                done[b] = (imgs, info)
                if j == len(wave) - 1:  # one event per wave keeps the bar monotonic
                    ctx.emit({"stage": "synthesis", "round": rnd, "batch": b,
                              "step": len(done) * cfg.synthesis.iterations, "total": total,
                              "losses": info.get("final", {})})

    def _make_in_workers(self, rnd, missing, labels_of, done, total) -> None:
        """In local one-thread worker processes (calib.dfq.workers); each batch is saved as it arrives."""
        ctx, cfg = self.ctx, self.ctx.cfg
        base, steps = len(done) * cfg.synthesis.iterations, {}

        def on_log(b, step, losses):
            steps[b] = step + 1
            ctx.emit({"stage": "synthesis", "round": rnd, "batch": b, "step": base + sum(steps.values()),
                      "total": total, "losses": losses})

        def on_done(b, imgs, info):
            if info["attempts"] > 1:
                log.warning("synthesis batch %d of round %d diverged (non-finite pixels); made on attempt %d",
                            b, rnd, info["attempts"])
            ctx.state.save_batch(rnd, b, imgs, labels_of(b), info)
            done[b] = (imgs, info)
            steps[b] = cfg.synthesis.iterations
            ctx.emit({"stage": "synthesis", "round": rnd, "batch": b, "step": base + sum(steps.values()),
                      "total": total, "losses": info.get("final", {})})

        n = workers_that_fit(ctx.synthesis_workers, self.setup.teacher, ctx.input_size, cfg.batch_size)
        ctx.record.synthesis_workers = n
        if n < 2:  # one batch at a time is all that fits: in this process, with all its threads
            log.info("synthesis: only one batch at a time fits in the available memory; making them in this "
                     "process instead of %d worker processes", ctx.synthesis_workers)
            self._make_in_waves(rnd, missing, labels_of, done, total)
            return
        if n < ctx.synthesis_workers:
            log.info("synthesis: %d worker processes fit in the available memory (of %d asked)", n,
                     ctx.synthesis_workers)
        try:
            make_in_workers(lambda b, log_fn: self._one(rnd, b, labels_of(b), log_fn), missing, n, on_log, on_done)
        except WorkersUnavailable as e:
            log.warning("synthesis workers unavailable in this process (%s); making the batches here at one "
                        "thread, which gives the same images", e)
            ctx.record.synthesis_workers = 1
            with one_thread():
                self._make_in_waves(rnd, [b for b in missing if b not in done], labels_of, done, total)

    def make(self, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx, cfg, dist = self.ctx, self.ctx.cfg, self.ctx.dist
        t0 = time.perf_counter()
        labels_all = self.labels(rnd)
        total = self.num_batches * cfg.synthesis.iterations

        def labels_of(b: int) -> torch.Tensor:
            return labels_all[b * cfg.batch_size:(b + 1) * cfg.batch_size]

        done = self._saved(rnd, labels_of)
        for i, b in enumerate(sorted(done)):
            ctx.emit({"stage": "synthesis", "round": rnd, "batch": b, "step": (i + 1) * cfg.synthesis.iterations,
                      "total": total, "losses": done[b][1].get("final", {})})
        missing = [b for b in range(self.num_batches) if b not in done]
        if missing and rnd == 0 and not self.q_ready and self.setup.student is not None and cfg.maskaq.w_mask > 0:
            self._init_q_on_noise()  # on every rank: the same deterministic Q for the whole round
        if ctx.synthesis_workers > 1 and missing:
            self._make_in_workers(rnd, missing, labels_of, done, total)
        else:
            self._make_in_waves(rnd, missing, labels_of, done, total)
        ctx.state.drop_rounds_before(rnd)
        finals = [done[b][1].get("final", {}) for b in range(self.num_batches)]
        ctx.record.curves["synthesis"].append({"round": rnd, "curve": done[0][1].get("curve", [])})
        keys = sorted({k for f in finals for k in f})
        ctx.record.final["synthesis"] = {k: sum(f.get(k, 0.0) for f in finals) / len(finals) for k in keys}
        ctx.record.seconds["synthesis"] += time.perf_counter() - t0
        self.rounds_made = max(self.rounds_made, rnd + 1)
        images = torch.cat([done[b][0] for b in range(self.num_batches)])
        if ctx.save_images and dist.is_main:
            path = save_image_grid(images, ctx.state.root / f"images_round{rnd:03d}.png", ctx.mean, ctx.std)
            ctx.record.images.append(str(path))
        return images, torch.cat([labels_of(b) for b in range(self.num_batches)])
