"""Multi-process calibration with torch.distributed: joining the process group from torchrun's environment,
and the few collectives the MaskAQ loop needs.

    torchrun --nproc_per_node 8 -m maskaq_deploy calibrate --model deit_small_patch16_224 ... --out RUN

torchrun (or any launcher that sets the same variables: Slurm + torchrun, a Kubernetes PyTorchJob) gives every
process RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``setup`` reads them and joins the default
process group: nccl when the run's device is CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPU. Without
WORLD_SIZE, or with WORLD_SIZE=1, it returns the single-process context and nothing distributed is initialized:
every helper below is then a no-op that calls no torch.distributed function, so one-process runs are unchanged.

Roles in a run (docs/distributed.md has the full picture):

* rank 0 alone reads and writes the run directory (checkpoints, synthetic batches, the artifact); what it reads
  on resume is broadcast, so the other ranks need no access to it;
* a value decided on rank 0 (resume state, a checkpoint) reaches the others through ``on_main``, which also
  re-raises rank 0's error on every rank, so a bad ``--out`` or a refused resume stops all ranks with the same
  one-line message instead of leaving the others waiting in a collective;
* a collective that fails (a peer died, a timeout) raises ``DistributedError``, whose message names this rank.

Timeout: every collective gives up after ``MASKAQ_DIST_TIMEOUT`` seconds (default 1800). It must exceed the
longest stretch one rank computes alone between two collectives, which is one synthesis batch (paper
schedule: 2000 iterations). A rank that dies is noticed much sooner: its sockets close (gloo) or torchrun sees
the exit and stops the other workers; the timeout is the backstop for a rank that hangs.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from maskaq_deploy.calib.errors import QuantError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MASKAQ_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

_owned = {"group": False}  # whether ``setup`` created the process group (then ``teardown`` destroys it)


class DistributedError(QuantError, RuntimeError):
    """A multi-process run failed: a collective with the other ranks failed, or the set-up is inconsistent.

    ``rank`` is the rank that raised it; the message starts with ``distributed calibration failed on rank N``.
    """

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _first_line(e: BaseException) -> str:
    """The gist of a (backend) error: its first line without gloo's source location and boilerplate advice."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line)
    return line.split(" This is typically caused by")[0][:300]


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) when there is none."""
    if os.environ.get("WORLD_SIZE", "").strip() in ("", "1"):
        return 0, 1, 0  # a plain run: RANK and friends may mean something else to other tools
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError("distributed set-up: RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch "
                               "with torchrun, which sets them") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"distributed set-up: RANK={rank} does not fit WORLD_SIZE={world}")
    return rank, world, local


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds (> 0)")
    return value


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" | "gloo" | None (single process)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}

    def device(self, requested) -> torch.device:
        """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
        dev = torch.device(requested)
        if self.enabled and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    # --- failure handling
    def failure(self, what: str, e: BaseException) -> DistributedError:
        """The one-line error naming this rank for a failed collective ``what``."""
        if isinstance(e, DistributedError):
            return e
        return DistributedError(f"distributed calibration failed on rank {self.rank}: {what}: {_first_line(e)} "
                                "(when another rank stopped first, its output or the launcher's report names it)",
                                self.rank)

    def _comm_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo takes CPU tensors
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # --- collectives (every rank must call them in the same order)
    def barrier(self, what: str = "barrier") -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        try:
            dist.barrier()
        except Exception as e:
            raise self.failure(what, e) from None

    def broadcast_object(self, obj, src: int = 0, what: str = "broadcast"):
        """``obj`` from rank ``src`` on every rank (small Python values: flags, dicts of losses)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        try:
            dist.broadcast_object_list(box, src=src)
        except Exception as e:
            raise self.failure(what, e) from None
        return box[0]

    def all_gather_object(self, obj, what: str = "all_gather") -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except Exception as e:
            raise self.failure(what, e) from None
        return out

    def broadcast_tensor(self, tensor: torch.Tensor, src: int = 0, what: str = "broadcast") -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank (others pass a tensor of the same shape and dtype); the result
        lies on the device the input was on."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        home, dtype = tensor.device, tensor.dtype
        # gloo has no bool collectives: quantizer flags travel as bytes
        buf = tensor.detach().to(self._comm_device(), torch.uint8 if dtype == torch.bool else dtype).contiguous()
        try:
            dist.broadcast(buf, src=src)
        except Exception as e:
            raise self.failure(what, e) from None
        return buf.to(home, dtype)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        home = tensor.device
        buf = tensor.detach().to(self._comm_device()).contiguous()
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        except Exception as e:
            raise self.failure(what, e) from None
        return buf.to(home)

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module, src: int = 0, what: str = "model state") -> None:
        """Copy every parameter and buffer of rank ``src``'s ``module`` into the others' (in place), so that all
        ranks hold bit-identical models whatever their hardware did while computing them."""
        if not self.enabled:
            return
        for name, t in module.state_dict(keep_vars=True).items():
            t.data.copy_(self.broadcast_tensor(t.data, src, f"broadcast of {what} ({name})"))

    def broadcast_optimizer_state(self, opt: torch.optim.Optimizer, src: int = 0) -> None:
        """Rank ``src``'s per-parameter optimizer state (e.g. SGD momentum) on every rank."""
        if not self.enabled:
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        layout = None
        if self.rank == src:
            layout = [(i, k, tuple(v.shape), str(v.dtype).replace("torch.", "")) if torch.is_tensor(v) else (i, k, v)
                      for i, p in enumerate(params) for k, v in sorted(opt.state.get(p, {}).items())]
        layout = self.broadcast_object(layout, src, "broadcast of the optimizer state")
        if self.rank != src:
            opt.state.clear()
        for entry in layout:
            i, key = entry[0], entry[1]
            p = params[i]
            if len(entry) == 3:  # a non-tensor value (e.g. a step count)
                opt.state[p][key] = entry[2]
                continue
            shape, dtype = entry[2], getattr(torch, entry[3])
            mine = opt.state[p].get(key) if self.rank == src else torch.empty(shape, dtype=dtype, device=p.device)
            opt.state[p][key] = self.broadcast_tensor(mine, src, "broadcast of the optimizer state")

    def on_main(self, fn, what: str = "rank 0's step"):
        """``fn()`` computed on rank 0 and returned on every rank; if it raises, every rank raises the same error
        (marked ``mirrored`` so that only rank 0 reports it)."""
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                payload = ("ok", fn())
            except Exception as e:
                try:
                    pickle.dumps(e)
                    sent = e
                except Exception:  # an exception that cannot travel: send its text
                    sent = DistributedError(f"on rank 0: {_first_line(e)}", 0)
                self.broadcast_object(("error", sent), 0, what)
                e.mirrored = True
                raise
            return self.broadcast_object(payload, 0, what)[1]
        status, value = self.broadcast_object(None, 0, what)
        if status == "error":
            value.mirrored = True
            raise value
        return value

    def check_same(self, value, what: str) -> None:
        """Raise on every rank when the ranks disagree on ``value`` (e.g. they loaded different weights)."""
        if not self.enabled:
            return
        values = self.all_gather_object(value, f"comparing the {what} across ranks")
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            err = DistributedError(f"distributed calibration failed: rank(s) {odd} have a different {what} than "
                                   f"rank 0 ({values[odd[0]]!r} vs {values[0]!r}); give every process the same "
                                   "model, checkpoint and options", odd[0])
            err.mirrored = True
            raise err

    # --- data-parallel training
    def wrap_ddp(self, module: nn.Module, example: torch.Tensor) -> nn.Module:
        """``module`` in DistributedDataParallel (the module itself in a single-process run).

        Buffers are not re-broadcast on every forward: the only ones (quantizer zero points and flags) are fixed
        after calibration and were synchronized then. ``find_unused_parameters`` (an extra graph walk per step)
        is switched on only when a probe forward leaves some trainable parameter without a gradient.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        unused = unused_parameters(module, example)
        if unused:
            log.info("%d parameters take no part in the forward (e.g. %s); DDP looks for unused ones each step",
                     len(unused), unused[0])
        kwargs = {"device_ids": [self.local_rank] if self.backend == "nccl" else None,
                  "find_unused_parameters": bool(unused)}
        # the option was renamed in recent torch (the old name warns)
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
        try:
            return DistributedDataParallel(module, **kwargs)
        except Exception as e:
            raise self.failure("setting up DistributedDataParallel", e) from None


def unused_parameters(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward of ``example`` (grads are reset)."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in params]
    for _, p in params:
        p.grad = None
    try:
        module(example).float().sum().backward()
        return [n for n, p in params if p.grad is None]
    finally:
        for (_, p), g in zip(params, saved):
            p.grad = g


SINGLE = DistContext()


def current() -> DistContext:
    """The context of the process group already joined (by ``setup`` or by the caller), else single-process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import torch.distributed as dist

        world = dist.get_world_size()
        if world > 1:
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            return DistContext(dist.get_rank(), world, local, str(dist.get_backend()))
    return SINGLE


def setup(device="cpu") -> DistContext:
    """Join the process group described by the launcher's environment (no-op without one); idempotent.

    ``device`` is the run's device: CUDA selects nccl and binds this process to ``cuda:LOCAL_RANK``; anything
    else selects gloo.
    """
    ctx = current()
    if ctx.enabled:
        return ctx
    rank, world, local = env_world()
    if world == 1:
        return SINGLE
    if not torch.distributed.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    import torch.distributed as dist

    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise DistributedError(f"distributed set-up failed on rank {rank}: LOCAL_RANK {local} needs a CUDA "
                                   f"device but torch sees {torch.cuda.device_count()}; start at most that many "
                                   "processes per node (--nproc_per_node)", rank)
        torch.cuda.set_device(local)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DistributedError(f"distributed set-up failed on rank {rank}: WORLD_SIZE={world} but {var} is "
                                   "not set; launch with torchrun, which sets it", rank)
    timeout = timeout_seconds()
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
    except Exception as e:
        raise DistributedError(f"distributed calibration failed on rank {rank}: joining the process group "
                               f"({backend}, {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): "
                               f"{_first_line(e)}", rank) from None
    _owned["group"] = True
    log.info("rank %d of %d joined the %s process group (local rank %d, timeout %.0f s)", rank, world, backend,
             local, timeout)
    return DistContext(rank, world, local, backend)


def teardown() -> None:
    """Leave the process group ``setup`` created (a group the caller created is left alone)."""
    if _owned["group"] and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _owned["group"] = False
