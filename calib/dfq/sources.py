"""Calibration sources: where a method's images come from and which training stages it allows.

A source gives the driver (calib.dfq.methods.run_calibration) two things: ``images(ctx, round)`` -- the
calibration / training set of a round -- and its stages, as flags the driver reads:

* ``reconstructs``: block-wise reconstruction of Q against P on the set (``recon_iters`` > 0);
* ``finetunes``: end-to-end distillation fine-tuning (``epochs`` > 0);
* ``refreshes``: the set is re-made with the current Q every ``refresh_every`` epochs.

Registered sources (``SOURCES``; their names are the calibration methods, ``method_names()``):

* ``maskaq``: MaskAQ synthesis (P and Q in the loop); every stage.
* ``psaq``: PSAQ-ViT synthesis (Q not used); calibration only, as published.
* ``noise``: N(0, 1) images in normalized space; calibration only.
* ``real``: the caller's images (a seeded subset of ``num_images``); reconstruction and fine-tuning when the
  config has them, never a refresh (there is nothing to re-synthesize).

A new source is a subclass registered with ``@register``; the driver and the config validation need no change
(both read the registry when they run).
"""

from __future__ import annotations

from operator import attrgetter

import torch

from maskaq_deploy.calib.dfq.config import DFQConfig
from maskaq_deploy.calib.dfq.errors import DFQConfigError
from maskaq_deploy.calib.dfq.images import save_image_grid
from maskaq_deploy.calib.dfq.rounds import SynthesisRounds
from maskaq_deploy.calib.dfq.run_context import RunContext
from maskaq_deploy.calib.dfq.state import derive_seed


class Source:
    name = ""
    reconstructs = False  # a bool, or the DFQConfig flag that turns reconstruction on ("real.reconstruct")
    finetunes = False
    refreshes = False
    needs_real_images = False

    def effective_config(self, cfg: DFQConfig) -> DFQConfig:
        """The config this source actually runs: the stages it does not have are switched off."""
        finetune = {}
        if not self.finetunes:
            finetune.update(epochs=0)
        if not self.refreshes:
            finetune.update(refresh_every=0)
        changes = {"finetune": cfg.finetune.replace(**finetune)} if finetune else {}
        reconstructs = self.reconstructs if isinstance(self.reconstructs, bool) else attrgetter(self.reconstructs)(cfg)
        if not reconstructs:
            changes.update(reconstruction=cfg.reconstruction.replace(iters=0))
        return cfg.replace(**changes) if changes else cfg

    def start(self, ctx: RunContext) -> None:
        """Called once before the first ``images``."""

    def images(self, ctx: RunContext, rnd: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def rounds(self) -> int:
        """How many synthesis rounds the run made (for the summary)."""
        return 0


SOURCES: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    SOURCES[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The calibration methods: every registered source's name, read now (a source registered later counts)."""
    return tuple(SOURCES)


def data_free_methods() -> tuple[str, ...]:
    """The methods that need no real images."""
    return tuple(name for name, cls in SOURCES.items() if not cls.needs_real_images)


def make_source(method: str) -> Source:
    try:
        return SOURCES[method]()
    except KeyError:
        raise DFQConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(SOURCES)}") from None


def _keep_grid(ctx: RunContext, images: torch.Tensor, name: str) -> None:
    if ctx.save_images and ctx.dist.is_main:
        ctx.record.images.append(str(save_image_grid(images, ctx.state.root / name, ctx.mean, ctx.std)))


class _Synthesized(Source):
    uses_student = False

    def __init__(self):
        self._rounds: SynthesisRounds | None = None

    def start(self, ctx):
        self._rounds = SynthesisRounds(ctx, self.name, self.uses_student)

    def images(self, ctx, rnd):
        return self._rounds.make(rnd)

    def rounds(self) -> int:
        return self._rounds.rounds_made if self._rounds else 0


@register
class MaskAQSource(_Synthesized):
    name = "maskaq"
    uses_student = True
    reconstructs = True
    finetunes = True
    refreshes = True


@register
class PSAQSource(_Synthesized):
    name = "psaq"


@register
class NoiseSource(Source):
    name = "noise"

    def images(self, ctx, rnd):
        g = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "noise"))
        imgs = torch.randn((ctx.cfg.num_images, *ctx.input_size), generator=g)
        _keep_grid(ctx, imgs, "images_noise.png")
        return imgs, None


@register
class RealSource(Source):
    name = "real"
    reconstructs = "real.reconstruct"  # the reference stays calibration-only (+ fine-tune) unless recon_real is set
    finetunes = True
    needs_real_images = True

    def images(self, ctx, rnd):
        g = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "real"))
        n = min(ctx.cfg.num_images, ctx.real_images.shape[0])
        idx = torch.randperm(ctx.real_images.shape[0], generator=g)[:n]
        imgs = ctx.real_images[idx].float()
        lbls = ctx.real_labels[idx].long() if ctx.real_labels is not None else None
        _keep_grid(ctx, imgs, "images_real.png")
        return imgs, lbls
