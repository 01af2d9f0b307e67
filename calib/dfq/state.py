"""Checkpoint / resume of a data-free calibration run, inside ``RUN/dfq/``.

    RUN/dfq/run.json                  fingerprint (config, method, model) and what has been completed
    RUN/dfq/round000/batch00000.safetensors   one synthesized batch: images (float16), labels, its loss curve
    RUN/dfq/calibrated.safetensors    Q right after observer calibration
    RUN/dfq/finetune.safetensors      Q + optimizer momentum after the last completed fine-tune epoch

Every file is written to a temporary name and renamed, so a kill leaves either the old or the new file.
Randomness is never carried in saved state: every batch and every epoch seeds its own generators from
(seed, stage, index), so redoing an interrupted unit reproduces it bit for bit on the same machine.

In a multi-process run (calib.dfq.distributed) only rank 0 touches these files. Opening the state and loading a
model checkpoint are collective: rank 0 reads, the other ranks receive what it read by broadcast (so they need
no access to the run directory, and a resume may use another number of processes); the ``save_*`` methods are
no-ops on the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from maskaq_deploy.calib.checkpoint import atomic_save_safetensors, atomic_write_json
from maskaq_deploy.calib.dfq.distributed import SINGLE, DistContext
from maskaq_deploy.calib.dfq.errors import ResumeError

STATE_VERSION = 1
STATE_DIR, STATE_FILE = "dfq", "run.json"  # RUN/dfq/run.json (maskaq_deploy.layout reads the names from here)


def derive_seed(seed: int, *keys) -> int:
    """A stable 63-bit seed for (seed, *keys); independent streams for each batch / epoch / purpose."""
    h = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generators(seed: int, device) -> tuple[torch.Generator, torch.Generator]:
    """(tensor generator on ``device``, CPU generator for scalars), both seeded from ``seed``."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    cpu = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
    return gen, cpu


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata)


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's float tensors (names, shapes, bytes); identifies the model a run started from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if "_quantizer." in k:
            continue
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def holds_work(run_dir) -> bool:
    """Whether ``run_dir`` holds calibration work worth resuming: synthetic batches or a fine-tune checkpoint
    (observer calibration alone is cheap to redo)."""
    root = Path(run_dir) / STATE_DIR
    # batch_path's files, and the model the fine-tune saves after each epoch (save_model("finetune", ...))
    return any(root.glob("round*/batch*.safetensors")) or (root / "finetune.safetensors").is_file()


class RunState:
    """The files of one run under ``run_dir/dfq``; ``dist``: the process's place in a multi-process run."""

    def __init__(self, run_dir, fingerprint: dict, resume: bool, dist: DistContext | None = None):
        self.root = Path(run_dir) / STATE_DIR
        self.fingerprint = fingerprint
        self.dist = dist or SINGLE
        self.writer = self.dist.is_main  # the one process that reads and writes the files
        self.meta, self.resumed = self.dist.on_main(lambda: self._open(resume), "opening the run state")

    def _open(self, resume: bool) -> tuple[dict, bool]:
        meta_path = self.root / STATE_FILE
        if resume and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise ResumeError(f"{meta_path} is corrupt ({e}); rerun without `resume` to start over") from None
            fingerprint = self.fingerprint
            if meta.get("fingerprint") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(meta.get("fingerprint", {}))
                              if fingerprint.get(k) != meta.get("fingerprint", {}).get(k))
                raise ResumeError(f"{self.root} holds a run with a different {', '.join(diff)}; rerun without "
                                  "`resume` to start over, or resume with the original settings")
            return meta, True
        if self.root.exists():
            shutil.rmtree(self.root)
        meta = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "epochs_done": 0}
        _atomic_json(meta_path, meta)
        return meta, False

    def _write_meta(self) -> None:
        if self.writer:
            _atomic_json(self.root / STATE_FILE, self.meta)

    # --- synthetic batches
    def round_dir(self, rnd: int) -> Path:
        return self.root / f"round{rnd:03d}"

    def batch_path(self, rnd: int, batch: int) -> Path:
        return self.round_dir(rnd) / f"batch{batch:05d}.safetensors"

    def save_batch(self, rnd: int, batch: int, images: torch.Tensor, labels: torch.Tensor, info: dict) -> Path:
        path = self.batch_path(rnd, batch)
        if self.writer:
            _atomic_save({"images": images, "labels": labels}, path, {"info": json.dumps(info)})
        return path

    def load_batch(self, rnd: int, batch: int):
        """(images, labels, info) of a saved batch, or None when it is missing or unreadable (always None on the
        ranks that do not own the files: they receive rank 0's batches by broadcast)."""
        path = self.batch_path(rnd, batch)
        if not self.writer or not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("info", "{}"))
                return f.get_tensor("images"), f.get_tensor("labels"), info
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError):
            return None

    def drop_rounds_before(self, rnd: int) -> None:
        if not self.writer:
            return
        for old in range(rnd):
            d = self.round_dir(old)
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)

    # --- other tensors of the run (e.g. the fine-tune's held-out images, which outlive their round)
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.writer:
            _atomic_save({k: v.contiguous() for k, v in tensors.items()}, self.root / f"{name}.safetensors")

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """Tensors saved under ``name``, on every rank (rank 0 reads); None when there are none."""
        def read():
            found = self._read(name)
            return found[0] if found is not None else None
        return self.dist.on_main(read, f"loading {name}")

    def _read(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, info metadata) of ``name``, or None when it is not there; an unreadable file is refused."""
        path = self.root / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("info", "{}"))
            return load_file(str(path)), info
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise ResumeError(f"cannot read {path} ({e}); rerun without `resume` to start over") from None

    # --- model / optimizer states
    def save_model(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   info: dict | None = None) -> Path:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if optimizer is not None:
            for idx, st in optimizer.state_dict()["state"].items():
                for key, val in st.items():
                    if torch.is_tensor(val):
                        tensors[f"opt.{idx}.{key}"] = val
        path = self.root / f"{name}.safetensors"
        if self.writer:
            _atomic_save(tensors, path, {"info": json.dumps(info or {})})
        return path

    def has_model(self, name: str) -> bool:
        """Whether checkpoint ``name`` exists (collective: rank 0 looks, every rank gets the answer)."""
        return self.dist.on_main(lambda: (self.root / f"{name}.safetensors").is_file(), f"looking for {name}")

    def load_model(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Restore ``model`` (and the optimizer's per-parameter state) from ``name``; returns its info dict,
        or None when there is no such checkpoint. Collective: rank 0 reads the file and every rank ends with its
        model and optimizer state."""
        info = self.dist.on_main(lambda: self._load_model(name, model, optimizer), f"loading {name}")
        if info is not None and self.dist.enabled:
            self.dist.broadcast_module(model, what=f"the {name} checkpoint")
            if optimizer is not None:
                self.dist.broadcast_optimizer_state(optimizer)
        return info

    def _load_model(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        found = self._read(name)
        if found is None:
            return None
        tensors, info = found
        path = self.root / f"{name}.safetensors"
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ResumeError(f"{path} does not fit the model ({str(e).splitlines()[0]}); "
                              "rerun without `resume` to start over") from None
        if optimizer is not None:
            opt_state: dict = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, idx, key = k.split(".", 2)
                    opt_state.setdefault(int(idx), {})[key] = v
            sd = optimizer.state_dict()
            sd["state"] = opt_state
            optimizer.load_state_dict(sd)
        return info

    # --- progress markers
    def mark(self, **fields) -> None:
        self.meta.update(fields)
        self._write_meta()
