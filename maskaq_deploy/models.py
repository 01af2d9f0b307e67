"""Model loading: the embedded MNIST ViT, any timm model name, local checkpoints, the hub cache.

Nothing is unpickled: ``.pth``/``.pt`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskaq_deploy import checks
from maskaq_deploy.calib.checkpoint import file_sha256
from maskaq_deploy.config import check_field_types
from maskaq_deploy.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
ASSETS_DIR = Path(__file__).parent / "assets" / "embedded"


@dataclass(frozen=True)
class ModelConfig:
    name: str = EMBEDDED  # "embedded" or a timm model name
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs
    checkpoint: str | None = None  # local .safetensors / .pth / .pt state dict
    pretrained: bool = False  # load timm's pretrained weights (offline: from the hub cache)
    mean: tuple[float, ...] | None = None  # overrides of the model's data config
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int, int] | None = None

    def __post_init__(self):
        check_field_types(self)
        for key in ("mean", "std", "input_size"):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        if not self.name:
            raise ModelError("`model.name` is empty; give 'embedded' or a timm model name")
        if not isinstance(self.kwargs, dict):
            raise ModelError("`model.kwargs` must be a JSON object, e.g. '{\"img_size\": 32}'")
        if self.checkpoint and self.pretrained:
            raise ModelError("give either `model.checkpoint` or `model.pretrained`, not both")
        if self.input_size is not None and (len(self.input_size) != 3 or min(self.input_size) < 1):
            raise ModelError("`model.input_size` takes three positive integers C,H,W (e.g. 3,224,224)")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ModelError("`model.mean` and `model.std` need the same number of channels")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) for v in values):
                raise ModelError(f"`model.{key}` {list(values)}: every value must be a finite number, e.g. 0.5,0.5,0.5")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ModelError("`model.std` values must be positive")


@dataclass
class LoadedModel:
    model: nn.Module
    display_name: str
    timm_name: str
    kwargs: dict
    data_config: dict  # mean, std, input_size, interpolation, crop_pct
    weights_sha256: str | None

    def manifest_entry(self) -> dict:
        return {"name": self.display_name, "timm_name": self.timm_name, "kwargs": self.kwargs,
                "data_config": self.data_config, "weights_sha256": self.weights_sha256}


def embedded_config() -> dict:
    path = ASSETS_DIR / "config.json"
    if not path.is_file():
        raise ModelError(f"the embedded model is missing from the installation ({path.name} not found); "
                         "reinstall maskaq-deploy")
    return json.loads(path.read_text())


def _create(timm_name: str, kwargs: dict, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for names"
        raise ModelError(f"unknown model {timm_name!r}{hint}")
    try:
        with _hub_offline(pretrained):
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ModelError(f"`model.kwargs` do not fit {timm_name}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise ModelError(f"cannot load pretrained weights for {timm_name} (offline and not in the hub "
                             f"cache?): {str(e).splitlines()[0]}; pass `model.checkpoint` FILE instead") from None
        raise ModelError(f"cannot build {timm_name} with kwargs {kwargs}: {str(e).splitlines()[0]}") from None


TORCH_MAGIC = (b"PK", b"\x80\x02")  # torch.save's zip format, and its legacy pickle (protocol 2)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(2)


@contextlib.contextmanager
def _hub_offline(active: bool):
    """--pretrained reads the hub cache only: no network retries, no retry warnings (a miss is one line)."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    hub_log = logging.getLogger("huggingface_hub")
    saved = constants.HF_HUB_OFFLINE, hub_log.level
    constants.HF_HUB_OFFLINE = True
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        hub_log.setLevel(saved[1])


def read_state_dict(path: Path) -> dict:
    """A state dict from .safetensors or .pth/.pt/.bin (weights only; nested 'model'/'state_dict' unwrapped)."""
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found")
    if path.suffix != ".safetensors" and _magic(path) not in TORCH_MAGIC:
        raise ModelError(f"checkpoint {path} cannot be read: it is not a torch or safetensors file (it starts "
                         f"with {_magic(path)!r}); give a .safetensors or a .pth/.pt saved with "
                         "torch.save(model.state_dict())")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise a zoo of exception types
        first = (str(e).splitlines() or [""])[0][:120]
        why = ("corrupt, or it pickles objects other than tensors" if "Weights only" in str(e)
               else f"{type(e).__name__}: {first}" if len(first) > 12 else "not a torch or safetensors file")
        raise ModelError(f"checkpoint {path} cannot be read as a weights-only state dict ({why}); give a "
                         ".safetensors or a .pth/.pt saved with torch.save(model.state_dict())") from None
    for key in ("model", "state_dict", "model_state", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    checks.finite_tensors(state, str(path))
    return state


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    for key, expected in own.items():  # the model's own order: the first mismatch is the earliest layer
        if key in state and state[key].shape != expected.shape:
            raise ModelError(f"checkpoint {source} does not fit the model: {key} has shape "
                             f"{tuple(state[key].shape)}, the model expects {tuple(expected.shape)}; check "
                             "`model.name` and `model.kwargs`")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise ModelError(f"checkpoint {source} does not fit the model: {first} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected); check `model.name` and `model.kwargs`")
    model.load_state_dict(state)


def resolve_data_config(model: nn.Module, cfg: ModelConfig, base: dict | None = None) -> dict:
    if base is None:
        from timm.data import resolve_data_config as timm_resolve

        base = dict(timm_resolve(model=model))
        # timm reports the pretrained config's size even when img_size/in_chans were changed: ask the model.
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None) is not None:
            base["input_size"] = (pe.proj.in_channels, *pe.img_size)
    dc = {
        "input_size": list(base["input_size"]),
        "mean": list(base["mean"]),
        "std": list(base["std"]),
        "interpolation": base.get("interpolation", "bilinear"),
        "crop_pct": float(base.get("crop_pct", 1.0)),
    }
    if cfg.input_size is not None:
        dc["input_size"] = list(cfg.input_size)
    if cfg.mean is not None:
        dc["mean"] = list(cfg.mean)
    if cfg.std is not None:
        dc["std"] = list(cfg.std)
    channels = dc["input_size"][0]
    for key in ("mean", "std"):
        if len(dc[key]) == 1 and channels > 1:
            dc[key] = dc[key] * channels
        if len(dc[key]) != channels:
            raise ModelError(f"`model.{key}` has {len(dc[key])} values but the model takes {channels} channels")
    return dc


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Build the model of ``cfg`` in eval mode, with its weights and its data config."""
    from maskaq_deploy.calib.errors import UnsupportedModelError
    from maskaq_deploy.calib.quantize import check_supported

    sha = None
    if cfg.name == EMBEDDED:
        emb = embedded_config()
        timm_name, kwargs = emb["timm_name"], {**emb["model_kwargs"], **cfg.kwargs}
        model = _create(timm_name, kwargs, pretrained=False)
        weights = Path(cfg.checkpoint) if cfg.checkpoint else ASSETS_DIR / "model.safetensors"
        load_state_dict_checked(model, read_state_dict(weights), str(weights.name))
        sha = file_sha256(weights)
        base = {k: emb[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    else:
        timm_name, kwargs = cfg.name, dict(cfg.kwargs)
        model = _create(timm_name, kwargs, pretrained=cfg.pretrained)
        if cfg.checkpoint:
            path = Path(cfg.checkpoint)
            load_state_dict_checked(model, read_state_dict(path), str(path))
            sha = file_sha256(path)
        elif not cfg.pretrained:
            log.warning("no --checkpoint and no --pretrained: %s has random weights (fine for speed, "
                        "meaningless for accuracy)", timm_name)
        base = None
    try:
        check_supported(model)
    except UnsupportedModelError as e:
        raise ModelError(str(e)) from None
    model.eval()
    data_config = resolve_data_config(model, cfg, base)
    return LoadedModel(model, cfg.name, timm_name, kwargs, data_config, sha)
