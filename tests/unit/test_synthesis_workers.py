"""Local synthesis worker processes (calib.dfq.workers) on plain functions: results, progress, errors, deaths."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from maskaq_deploy.calib.dfq import workers
from maskaq_deploy.calib.dfq.errors import DFQConfigError, SynthesisError

pytestmark = pytest.mark.skipif(not workers.can_fork(), reason="synthesis workers need fork (Linux)")


@pytest.fixture(autouse=True)
def autograd_usable(monkeypatch):
    # These toy batches use no autograd; earlier tests in this process may have made it unusable after a fork.
    monkeypatch.setattr(workers, "_autograd_problem", lambda: None)


def square_batch(b, on_log):
    for step in range(3):
        on_log(step, {"loss": float(b * 10 + step)})
    return torch.full((2, 2), float(b * b), dtype=torch.float16), {"attempts": 1, "pid": os.getpid(),
                                                                     "threads": torch.get_num_threads()}


def test_every_batch_comes_back_once_with_its_progress():
    done, logs = {}, []
    workers.make_in_workers(square_batch, [0, 1, 2, 3, 4], 2, lambda b, s, losses: logs.append((b, s, losses)),
                            lambda b, imgs, info: done.setdefault(b, (imgs, info)))
    assert sorted(done) == [0, 1, 2, 3, 4]
    for b, (imgs, info) in done.items():
        assert imgs.dtype == torch.float16 and torch.equal(imgs, torch.full((2, 2), float(b * b), dtype=torch.float16))
        assert info["pid"] != os.getpid() and info["threads"] == 1  # made in a one-thread worker
    assert sorted(logs) == [(b, s, {"loss": float(b * 10 + s)}) for b in range(5) for s in range(3)]


def tiny_batch(b, on_log):
    return torch.zeros(1, dtype=torch.float16), {"attempts": 1}


def test_more_batch_indices_than_the_task_pipe_holds_are_all_made():
    done = {}
    workers.make_in_workers(tiny_batch, list(range(6000)), 2, lambda *a: None,
                            lambda b, imgs, info: done.setdefault(b, 1))  # ~100 KB of queued indices
    assert sorted(done) == list(range(6000))


def test_more_workers_than_batches_starts_one_per_batch():
    done = {}
    workers.make_in_workers(square_batch, [7], 4, lambda *a: None, lambda b, imgs, info: done.setdefault(b, info))
    assert list(done) == [7]


def fails_on_two(b, on_log):
    if b == 2:
        raise DFQConfigError("batch 2 is bad; fix the config")
    return square_batch(b, on_log)


def test_a_workers_error_is_raised_in_the_parent_with_its_type_and_message():
    with pytest.raises(DFQConfigError, match="batch 2 is bad; fix the config"):
        workers.make_in_workers(fails_on_two, [0, 1, 2, 3], 2, lambda *a: None, lambda *a: None)


def killed_on_one(b, on_log):
    if b == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return square_batch(b, on_log)


def test_a_worker_that_dies_raises_a_one_line_synthesis_error():
    with pytest.raises(SynthesisError, match=r"worker process died \(exit code -9.*`resume`"):
        workers.make_in_workers(killed_on_one, [0, 1, 2, 3], 2, lambda *a: None, lambda *a: None)


def test_workers_that_cannot_run_autograd_say_so(monkeypatch):
    monkeypatch.setattr(workers, "_autograd_problem", lambda: "autograd is unusable here")
    done = {}
    with pytest.raises(workers.WorkersUnavailable, match="autograd is unusable here"):
        workers.make_in_workers(square_batch, [0, 1], 2, lambda *a: None, lambda b, *a: done.setdefault(b, a))
    assert not done


def test_activation_bytes_count_every_leaf_output_for_one_image():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Sequential(torch.nn.ReLU()))
    # Flatten 12 + Linear 5 + ReLU 5 float32 values
    assert workers.activation_bytes_per_image(model, (3, 2, 2)) == (12 + 5 + 5) * 4


def test_workers_are_capped_by_the_memory_one_batch_needs(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Sequential(torch.nn.ReLU()))
    per_worker = workers.MEMORY_FACTOR * 8 * 88  # batch 8, 88 bytes of outputs per image
    for avail, expected in ((None, 4), (100 * per_worker, 4), (3 * per_worker / workers.MEMORY_SHARE, 3),
                            (per_worker, 1), (0, 1)):
        monkeypatch.setattr(workers, "available_memory", lambda avail=avail: avail)
        assert workers.workers_that_fit(4, model, (3, 2, 2), 8) == expected, avail


def test_worker_count_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert workers.resolve_workers(None, cpu, distributed=False) == 3  # one per torch thread
    assert workers.resolve_workers(2, cpu, distributed=False) == 2
    assert workers.resolve_workers(None, cpu, distributed=True) == 1  # torchrun ranks split the batches already
    assert workers.resolve_workers(4, cuda, distributed=False) == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DFQConfigError, match="synthesis_workers must be a positive integer"):
            workers.resolve_workers(bad, cpu, distributed=False)
