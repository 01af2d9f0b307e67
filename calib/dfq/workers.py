"""Synthesis batches in local worker processes: on a multi-core CPU, one process per thread, one thread each.

Why processes: a synthesis batch of a small ViT is a long chain of small ops whose Python and dispatch overhead
does not parallelize inside one process. On 2 cores, two threads in one process make synthesis 1.67x faster
than one thread, two one-thread processes 2.01x (docs/distributed.md). Batches need no communication: each
seeds itself from (seed, round, batch), and only its finished pixels come back.

Same pixels for any number of workers: every batch is made at one torch thread, as a one-thread process makes
it in place, so on a given machine the set does not depend on the worker count, and a resumed run that makes
the missing batches in fewer workers gets the images the interrupted one would have made. The exception is
the memory cap: when only one batch at a time fits, the calling process makes them with all its threads
(``workers_that_fit``), whose numerics differ from one thread's.

Linux only (``fork``): the workers inherit the models and the synthesis set-up from the parent at the moment
they start, so nothing is pickled but the batch indices going out and the pixels coming back (as numpy arrays:
torch's shared-memory tensor passing would need the worker alive until the parent has read them). Elsewhere,
on CUDA, and in a torchrun job (whose ranks already split the batches), synthesis stays in the process.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from maskaq_deploy.calib.dfq.errors import DFQConfigError, SynthesisError
from maskaq_deploy.errors import MaskAQDeployError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
POLL_S = 1.0  # how often the parent checks that its workers are still alive while it waits
# Peak memory of one synthesis batch over (batch size x the bytes of P's module outputs for one image): 1.6 to
# 4.4 measured (embedded, vit_gap, Swin and deit_s2 at batch 64, deit_tiny at 224 px and batch 16); 6 leaves room.
MEMORY_FACTOR = 6
MEMORY_SHARE = 0.75  # of the memory available when the workers start, for all of them together
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number

# Set by the parent just before it forks the workers, which inherit it; cleared when they are done.
_TASK: dict[str, Callable] = {}


class WorkersUnavailable(MaskAQDeployError):
    """Forked workers cannot run autograd in this process: something here (e.g. an ONNX export of a quantized
    model) started autograd's device threads before the fork. The caller makes the batches itself instead."""


def can_fork() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def resolve_workers(requested: int | None, device: torch.device, distributed: bool) -> int:
    """The number of synthesis worker processes: ``requested``, or by default one per torch thread on a CPU
    (``torch.get_num_threads()``, which OMP_NUM_THREADS sets); 1 (in-process) on CUDA, in a torchrun job and
    where fork is unavailable."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise DFQConfigError(f"synthesis_workers must be a positive integer, got {requested!r}")
    if distributed or device.type != "cpu" or not can_fork():
        return 1
    return requested if requested is not None else max(1, torch.get_num_threads())


@contextlib.contextmanager
def one_thread():
    """This process at one torch thread for a while: the numerics of a worker."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or less under a container's (cgroup) limit; None
    when unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < UNLIMITED:
            left = max(0, int(limit) - usage)
            avail = left if avail is None else min(avail, left)
        break
    return avail


def activation_bytes_per_image(model: torch.nn.Module, input_size) -> int:
    """The bytes of every leaf module's output for one input image (attention maps included where the model
    computes them in modules, as the synthesis teacher does): the scale of one batch's memory."""
    total = 0

    def count(_module, _inputs, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        param = next(model.parameters(), None)
        x = torch.zeros((1, *input_size), device=param.device if param is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def workers_that_fit(workers: int, model: torch.nn.Module, input_size, batch_size: int) -> int:
    """``workers``, or fewer when that many synthesis batches at once would not fit in the available memory
    (each worker holds one batch's activations of P and Q and their backward)."""
    avail = available_memory()
    if avail is None:
        return workers
    per_worker = MEMORY_FACTOR * batch_size * max(1, activation_bytes_per_image(model, input_size))
    return max(1, min(workers, int(avail * MEMORY_SHARE // per_worker)))


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the parent dies, even by SIGKILL (which runs no clean-up): an
    orphaned worker would otherwise go on making the remaining batches for nobody."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _autograd_problem() -> str | None:
    """Why autograd cannot run in this forked worker, or None: it refuses to in a child forked after it started
    its device threads in the parent."""
    try:
        x = torch.zeros(1, requires_grad=True)
        (x * 2).sum().backward()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def _worker_main(tasks, results, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    logging.disable(logging.CRITICAL)  # a handler's lock may have been held at the fork; the parent logs
    torch.set_num_threads(1)
    problem = _autograd_problem()
    if problem:
        results.put(("unavailable", -1, problem))
        return
    make = _TASK["make"]
    while (b := tasks.get()) is not None:
        try:
            images, info = make(b, lambda step, losses, b=b: results.put(("log", b, (step, losses))))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
            results.put(("error", b, _picklable(e)))
            return
        results.put(("done", b, (images.numpy(), info)))


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception that cannot travel is sent as its message
        return SynthesisError(f"a synthesis worker failed: {type(e).__name__}: {e}")


def make_in_workers(make: Callable, batches: list[int], workers: int,
                    on_log: Callable[[int, int, dict], None], on_done: Callable[[int, torch.Tensor, dict], None]
                    ) -> None:
    """Run ``make(b, on_log) -> (images, info)`` for every batch index in ``min(workers, len(batches))``
    forked one-thread processes. ``on_log(b, step, losses)`` and ``on_done(b, images, info)`` run in this
    process as the workers report (``on_done`` in completion order, so each finished batch can be saved at
    once). A worker's error is raised here; a worker that dies (killed, out of memory) raises SynthesisError.
    The workers are stopped however this returns."""
    mp = multiprocessing.get_context("fork")
    tasks, results = mp.SimpleQueue(), mp.Queue()
    n = min(workers, len(batches))
    _TASK["make"] = make
    procs = [mp.Process(target=_worker_main, args=(tasks, results, os.getpid()), daemon=True,
                        name=f"maskaq-synthesis-{i}") for i in range(n)]
    try:
        for p in procs:
            p.start()
        # after the start: the pipe holds ~64 KB, and thousands of queued indices would block with no reader
        for b in [*batches, *[None] * n]:
            tasks.put(b)
        remaining, idle_after_exit = set(batches), 0
        while remaining:
            try:
                kind, b, payload = results.get(timeout=POLL_S)
            except queue.Empty:
                # all exited cleanly with work left: wait one more poll for what they sent last
                idle_after_exit = idle_after_exit + 1 if _all_exited(procs) else 0
                if idle_after_exit > 1:
                    raise SynthesisError("the synthesis workers stopped before every batch was made; rerun "
                                         "with `resume`") from None
                continue
            if kind == "log":
                on_log(b, *payload)
            elif kind == "error":
                raise payload
            elif kind == "unavailable":
                raise WorkersUnavailable(payload)
            else:
                images, info = payload
                remaining.discard(b)
                on_done(b, torch.from_numpy(images), info)
    finally:
        _TASK.clear()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        results.close()


def _all_exited(procs) -> bool:
    """Whether every worker has exited cleanly; raises SynthesisError when one died."""
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise SynthesisError(f"a synthesis worker process died (exit code {dead[0].exitcode}: killed, or out of "
                             "memory?); rerun with `resume` to continue from the saved batches, or set "
                             "OMP_NUM_THREADS=1 to synthesize in one process")
    return all(p.exitcode == 0 for p in procs)
