"""Calibration across processes (torchrun, gloo, 2 CPU processes) against one process, on a tiny random ViT.

* the synthetic set of a 2-process run equals the 1-process set image for image (bit for bit);
* the fine-tuned checkpoint of a 2-process run matches the 1-process run with the same global batch and seed
  within FINETUNE_RTOL (see there); the artifact has the same files and manifest layout;
* killing one rank fails the whole job fast, with the rank named, and ``--resume`` then completes the run;
* a single-process run joins no process group; the CLI names the rank of a failure in a multi-process job.

Every process runs one thread, so runs are reproducible and the two processes fit the two cores of CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskaq_deploy.rundir import staging_path

ROOT = Path(__file__).resolve().parents[2]

# Max |w_2proc - w_1proc| / max |w| over every tensor of the artifact. The two runs see the same images in the
# same steps and differ only in floating-point summation order (per-rank batches, gradient all-reduce);
# measured here: 5e-6 (model), 2e-7 (quantizer scales). Fine-tuning moves the weight matrices by 1.6e-2, more
# than 50x this bound (checked below), so the bound does tell the runs apart from unrelated ones.
FINETUNE_RTOL = 1e-4

# 5 synthesis batches (4, 4, 4, 4, 1 images): 3 waves on 2 ranks. Fine-tune batches of 8, 8, 1: in the last
# step rank 1 has no image of its own (it joins the all-reduce with a zero share).
TOML = """
[model]
name = "vit_tiny_patch16_224"
kwargs = {{img_size = 16, patch_size = 4, in_chans = 1, num_classes = 10, embed_dim = 32, depth = 2, \
num_heads = 2, mlp_ratio = 2.0}}
mean = [0.1307]
std = [0.3081]

[calibrate]
recipe = "w4a4"
seed = 0

[dfq]
num_images = 17
batch_size = 4
iterations = {iterations}
epochs = 2
refresh_every = {refresh}
ft_batch_size = 8
ft_lr = 0.02
ft_holdout = 0.25
calib_batch_size = 16
q_init_images = 8
log_every = 3
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MASKAQ_DIST_TIMEOUT="30", PYTHONPATH=str(ROOT))
    return env


def _config(tmp: Path, name: str, iterations: int = 6, refresh: int = 0) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(TOML.format(iterations=iterations, refresh=refresh))
    return path


def _command(nproc: int, config: Path, out: Path, *extra: str) -> list[str]:
    cli = ["-m", "maskaq_deploy", "calibrate", "--config", str(config), "--out", str(out), "--quiet", *extra]
    if nproc == 1:
        return [sys.executable, *cli]  # a plain process: no torchrun, no process group
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_free_port()), *cli]


def _run(nproc: int, config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run(_command(nproc, config, out, *extra), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"{nproc}-process run failed:\n{res.stderr[-3000:]}"
    return res


def _run_here(config: Path, out: Path) -> None:
    """The one-process reference, run in this process (no interpreter start-up) with one thread, like the
    subprocesses."""
    from click.testing import CliRunner

    from maskaq_deploy.cli import cli

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(cli, ["calibrate", "--config", str(config), "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(saved)
    assert res.exit_code == 0, res.output[-3000:]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest |a - b| of a tensor relative to the tensor's largest |value|, over all tensors."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        scale = torch.maximum(x.abs().max(), y.abs().max()).clamp_min(1e-12)
        worst = max(worst, float((x - y).abs().max() / scale))
    return worst


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same calibration (fine-tuning, no refresh) run by one plain process and by torchrun with two."""
    tmp = tmp_path_factory.mktemp("dist")
    cfg = _config(tmp, "plain")
    _run_here(cfg, tmp / "one")
    res = _run(2, cfg, tmp / "two")
    return tmp / "one", tmp / "two", res


def test_synthetic_set_of_two_processes_equals_one_process(one_and_two):
    one, two, _ = one_and_two
    files = sorted(p.name for p in (one / "dfq" / "round000").glob("batch*.safetensors"))
    assert len(files) == 5
    assert files == sorted(p.name for p in (two / "dfq" / "round000").glob("batch*.safetensors"))
    for name in files:
        a, b = _tensors(one / "dfq" / "round000" / name), _tensors(two / "dfq" / "round000" / name)
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["images"], b["images"]), f"{name}: images differ between 1 and 2 processes"


def test_finetuned_checkpoint_of_two_processes_matches_one_process(one_and_two):
    one, two, res = one_and_two
    assert "by 2 processes" in res.stdout
    # same artifact layout
    listing = sorted(p.name for p in one.iterdir())
    assert listing == sorted(p.name for p in two.iterdir()) == ["dfq", "manifest.json", "model.safetensors",
                                                                "quant.safetensors"]
    m1, m2 = json.loads((one / "manifest.json").read_text()), json.loads((two / "manifest.json").read_text())
    assert m1.keys() == m2.keys()
    assert m2["calibration"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert "distributed" not in m1["calibration"]
    # the weights: within the tolerance of each other, and fine-tuning moved them far more than that
    for f in ("model.safetensors", "quant.safetensors"):
        assert _max_rel_diff(_tensors(one / f), _tensors(two / f)) <= FINETUNE_RTOL, f
    calibrated = {k.removeprefix("model."): v for k, v in _tensors(one / "dfq" / "calibrated.safetensors").items()
                  if k.startswith("model.") and k.endswith(".weight") and v.ndim == 2}
    final = {k: v for k, v in _tensors(one / "model.safetensors").items() if k in calibrated}
    assert _max_rel_diff(calibrated, final) > 50 * FINETUNE_RTOL
    # the losses reported are global-batch means, like one process's
    l1, l2 = m1["calibration"]["final_losses"], m2["calibration"]["final_losses"]
    # (the uneven last batch of the 13 images it trains on splits 3+2 over the ranks: summation orders differ
    # by ~1e-4 relative, and by a few 1e-8 on the KD term near 1e-6; a wrong mean would be off by ~2x)
    for stage in ("synthesis", "finetune"):
        assert l2[stage] == pytest.approx(l1[stage], rel=1e-3, abs=1e-7)


def _worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its direct children, identified by their RANK variable)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(entry.name)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_killing_one_rank_fails_fast_then_resume_completes(tmp_path):
    cfg = _config(tmp_path, "refresh", iterations=10, refresh=1)  # a refresh makes synthesis run twice
    out = tmp_path / "run"
    stderr = (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen(_command(2, cfg, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)
    try:
        # killed in the refresh: the resume then loads the epoch-0 checkpoint (Q and momentum), the refresh
        # round's first saved wave, and makes the rest
        trigger = staging_path(out) / "dfq" / "round001" / "batch00001.safetensors"  # the run is written there
        deadline = time.monotonic() + 120
        while not trigger.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the job ended before the kill point"
        workers = _worker_pids(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        rc = proc.wait(timeout=90)  # a guard against a hang, not a measurement
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr.seek(0)
    err = stderr.read()
    stderr.close()
    assert rc != 0
    # torchrun's report names the dead rank; the survivor's one-line error names itself
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", err), err[-3000:]
    assert "error: distributed calibration failed on rank 0" in err or "exitcode  : -15" in err, err[-3000:]
    assert not re.search(r"\[rank\d\]:.*Traceback", err), err[-3000:]  # no worker traceback, only torchrun's report
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers.values()), "a worker outlived the job"
    assert not out.exists()  # nothing replaces --out before the job succeeds; the stage keeps the batches
    assert not json.loads((staging_path(out) / "dfq" / "run.json").read_text()).get("completed")

    # resume the interrupted job with the same launch; it reuses the saved batches and completes
    res = _run(2, cfg, out, "--resume")
    assert "by 2 processes" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["resumed"] is True and manifest["calibration"]["rounds"] == 2
    assert [e["epoch"] for e in manifest["calibration"]["curves"]["finetune"]] == [0, 1]
    assert json.loads((out / "dfq" / "run.json").read_text()).get("completed") is True
    # and it agrees with one uninterrupted process (refresh included) within the fine-tune tolerance
    _run_here(cfg, tmp_path / "one")
    for f in ("model.safetensors", "quant.safetensors"):
        assert _max_rel_diff(_tensors(tmp_path / "one" / f), _tensors(out / f)) <= FINETUNE_RTOL, f


def _hand_launched_pair(tmp_path, sig: int, extra_env: dict | None = None) -> tuple[int, float, str]:
    """Start ranks 0 and 1 by hand (torchrun's variables, no torchrun), send ``sig`` to rank 1 once rank 0 has
    saved a batch, and return (rank 0's exit code, rank 0's stderr). Rank 0 must exit on its own: the wait for it
    is bounded only as a guard against a hang."""
    cfg = _config(tmp_path, "plain", iterations=30)
    out = tmp_path / "run"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "maskaq_deploy", "calibrate", "--config", str(cfg), "--out", str(out), "--quiet"]
    procs, logs = [], []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(extra_env or {})}
        logs.append((tmp_path / f"rank{rank}.txt").open("w+"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
    try:
        trigger = staging_path(out) / "dfq" / "round000" / "batch00001.safetensors"
        deadline = time.monotonic() + 120
        while not trigger.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert procs[0].poll() is None and procs[1].poll() is None, "a rank ended before the signal point"
        procs[1].send_signal(sig)
        rc = procs[0].wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        logs[0].seek(0)
        err = logs[0].read()
        for f in logs:
            f.close()
    return rc, err


def _assert_one_error_line_naming_rank_0(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: distributed calibration failed on rank 0: "), err[-2000:]
    assert "Traceback" not in err


def test_without_torchrun_the_survivor_fails_alone_naming_its_rank(tmp_path):
    """Processes started by another launcher (here: by hand, with torchrun's variables): nobody stops the
    survivor, so it must notice the dead peer itself and exit with one line, not hang."""
    rc, err = _hand_launched_pair(tmp_path, signal.SIGKILL)
    assert rc == 1
    _assert_one_error_line_naming_rank_0(err)
    assert not json.loads((staging_path(tmp_path / "run") / "dfq" / "run.json").read_text()).get("completed")


@pytest.mark.slow
def test_a_hung_rank_is_caught_by_the_collective_timeout(tmp_path):
    """A rank that stops responding without dying (SIGSTOP: no socket closes, no exit for a launcher to see):
    the others give up after MASKAQ_DIST_TIMEOUT instead of waiting forever. Slow (it waits out the timeout);
    test_setup_passes_the_timeout checks the set-up in the quick run."""
    rc, err = _hand_launched_pair(tmp_path, signal.SIGSTOP, {"MASKAQ_DIST_TIMEOUT": "8"})
    assert rc == 1  # without the timeout rank 0 would wait forever, past the guard of _hand_launched_pair
    _assert_one_error_line_naming_rank_0(err)
    assert not json.loads((staging_path(tmp_path / "run") / "dfq" / "run.json").read_text()).get("completed")


def test_setup_passes_the_timeout(monkeypatch):
    from maskaq_deploy.calib.dfq import distributed

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    monkeypatch.setattr(distributed, "current", lambda: distributed.SINGLE)
    for var, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", distributed.TIMEOUT_ENV: "42"}.items():
        monkeypatch.setenv(var, value)
    ctx = distributed.setup("cpu")
    monkeypatch.setitem(distributed._owned, "group", False)  # nothing was really joined
    assert (ctx.rank, ctx.world_size, ctx.backend) == (1, 2, "gloo")
    assert seen["timeout"].total_seconds() == 42 and seen["backend"] == "gloo"
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(distributed.DistributedError, match="MASKAQ_DIST_TIMEOUT"):
        distributed.setup("cpu")
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S


def test_a_single_process_joins_no_process_group(monkeypatch):
    from maskaq_deploy.calib.dfq import distributed

    for world in (None, "1"):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        ctx = distributed.setup("cpu")
        assert ctx == distributed.SINGLE and not ctx.enabled and ctx.is_main
        assert not torch.distributed.is_initialized()
    # every helper is then a plain local operation
    t = torch.arange(3.0)
    assert ctx.broadcast_tensor(t) is t and ctx.all_reduce_sum(t) is t
    assert ctx.on_main(lambda: 7) == 7 and ctx.broadcast_object({"a": 1}) == {"a": 1}
    module = torch.nn.Linear(2, 2)
    assert ctx.wrap_ddp(module, torch.zeros(1, 2)) is module


def test_local_slices_cover_the_global_batch_once():
    from maskaq_deploy.calib.dfq.finetune import local_slice

    for n in (1, 2, 7, 8):
        x, y = torch.arange(n).float().reshape(n, 1), torch.arange(n)
        parts = [local_slice(x, y, r, 2) for r in range(2)]
        assert sum(share for _, _, share in parts) == pytest.approx(1.0)
        kept = torch.cat([py for _, py, share in parts if share > 0])
        assert torch.equal(kept, y)  # in order, each image once
        assert all(len(px) >= 1 for px, _, _ in parts)  # a rank without images still runs one (share 0)


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
def test_cli_names_the_failed_rank(monkeypatch, rank, mirrored):
    from click.testing import CliRunner

    import maskaq_deploy.pipeline as pipeline
    from maskaq_deploy.calib.dfq.errors import SynthesisError
    from maskaq_deploy.cli import cli

    def fail(*args, **kwargs):
        err = SynthesisError("synthesis diverged 3 times on batch 4")
        if mirrored:
            err.mirrored = True  # raised on every rank alike (e.g. rank 0's refusal, shared by on_main)
        raise err

    monkeypatch.setattr(pipeline, "calibrate", fail)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(cli, ["calibrate", "--out", "unused"])
    assert res.exit_code == 1
    if mirrored and rank == 1:
        assert res.output == ""  # rank 0 reports it once
    elif mirrored:
        assert res.output.strip() == "error: synthesis diverged 3 times on batch 4"
    else:
        assert res.output.strip() == f"error: distributed calibration failed on rank {rank}: synthesis diverged 3 " \
                                     "times on batch 4"


@pytest.mark.parametrize("rank", [0, 1])
def test_build_refuses_to_run_under_torchrun(monkeypatch, rank):
    from click.testing import CliRunner

    from maskaq_deploy.cli import cli

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(cli, ["build", "--out", "unused"])
    assert res.exit_code == 2
    assert res.output.strip() == ("" if rank else "error: build runs in one process; for several processes "
                                  "launch 'torchrun ... -m maskaq_deploy calibrate --out RUN', then run "
                                  "'maskaq-deploy export RUN' and 'maskaq-deploy verify RUN'")
