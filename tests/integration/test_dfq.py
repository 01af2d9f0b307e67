"""Data-free calibration end to end on tiny timm ViTs: methods, frozen teacher, determinism, kill + resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskaq_deploy.calib import RECIPES, attach_quantizers, iter_quantizers
from maskaq_deploy.calib.dfq import DFQConfig, ResumeError, run_calibration
from maskaq_deploy.calib.dfq.finetune import finetune_epoch, make_optimizer
from maskaq_deploy.calib.dfq.models import make_teacher, token_layout
from maskaq_deploy.calib.dfq.synthesis import SynthesisSetup, synthesize_batch
from maskaq_deploy.calib.quantizers import ActQuantizer
from maskaq_deploy.runtimes.compare import sqnr_db

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "mlp_ratio": 2.0}
DATA = {"mean": (0.1307,), "std": (0.3081,), "input_size": (1, 16, 16)}
# Small but complete: 3 synthesis batches, calibration, reconstruction of both blocks (focused, as in the presets),
# 3 fine-tune epochs with a refresh before epoch 2, guarded by 6 held-out images.
SMALL = {"num_images": 24, "batch_size": 8, "iterations": 12, "epochs": 3, "refresh_every": 2, "ft_batch_size": 8,
             "calib_batch_size": 16, "q_init_images": 8, "log_every": 4, "recon_iters": 4, "recon_batch_size": 8,
             "recon_focus": 0.5, "ft_holdout": 0.25}


@pytest.fixture(autouse=True)
def one_thread():
    # Bit-identical comparisons need the same reduction order in every run (and in the child processes).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_models(recipe: str = "w4a4", seed: int = 0, state: dict | None = None):
    import timm

    torch.manual_seed(seed)
    fp = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    if state is not None:
        fp.load_state_dict(state)
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES[recipe])
    return fp, q


def toy_batch(n: int, g: torch.Generator):
    """A 10-class toy task on 16x16 images: class c = a blob at one of 10 grid positions, plus noise."""
    y = torch.randint(0, 10, (n,), generator=g)
    cy, cx = (y // 4).float() * 5 + 3, (y % 4).float() * 4 + 2
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    d = ((yy - cy[:, None, None] + torch.randn(n, 1, 1, generator=g) * 0.7) ** 2
         + (xx - cx[:, None, None] + torch.randn(n, 1, 1, generator=g) * 0.7) ** 2)
    blob = torch.exp(-d / 4.0) * (0.6 + 0.4 * torch.rand(n, 1, 1, generator=g))
    img = blob + 0.15 * torch.rand(n, 16, 16, generator=g)
    return ((img.clamp(0, 1) - 0.1307) / 0.3081).unsqueeze(1), y


@pytest.fixture(scope="module")
def trained_state():
    """A tiny ViT trained for a few seconds on the toy task (a random ViT's output barely depends on its
    input, so synthesis could not reach its targets)."""
    import timm
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        x, y = toy_batch(64, g)
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x, y = toy_batch(500, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (m(x).argmax(1) == y).float().mean() > 0.95
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def q_state(q) -> dict:
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def run(q_fp, run_dir, method="maskaq", resume=False, synthesis_workers=None, **cfg):
    fp, q = q_fp
    config = DFQConfig.from_dict({**SMALL, **cfg})
    return run_calibration(fp, q, method=method, config=config, data_config=DATA, run_dir=run_dir,
                           resume=resume, real_images=torch.randn(40, 1, 16, 16), real_labels=torch.arange(40) % 10,
                           synthesis_workers=synthesis_workers)


def all_calibrated(q) -> bool:
    acts = [m for _, m in iter_quantizers(q) if isinstance(m, ActQuantizer)]
    return bool(acts) and all(bool(m.initialized) for m in acts)


def test_fast_preset_end_to_end_on_a_tiny_model(tmp_path, trained_state, monkeypatch):
    from maskaq_deploy.calib.dfq import rounds

    fp, q = tiny_models("w8a8", state=trained_state)
    events, synthesized = [], []
    synthesize_batch = rounds.synthesize_batch
    monkeypatch.setattr(rounds, "synthesize_batch", lambda *args: synthesized.append(1) or synthesize_batch(*args))
    # the preset's 100 steps, which it takes below 8 bits: at w8a8 it takes 50 (test_sources checks that), after
    # which this tiny teacher gives only ~80% of the images their targets, too close to a threshold
    cfg = DFQConfig.from_preset("fast", iterations_8bit=0)
    summary = run_calibration(fp, q, method="maskaq", config=cfg, data_config=DATA,
                              run_dir=tmp_path, progress=events.append, save_images=True)
    # the work the preset asks for, once: each batch synthesized once, no fine-tuning (calibration-only PTQ)
    assert len(synthesized) == -(-cfg.num_images // cfg.batch_size)
    assert summary["curves"]["finetune"] == []
    assert all_calibrated(q)
    assert summary["num_images"] == 256 and summary["rounds"] == 1 and summary["resumed"] is False
    assert set(summary["seconds"]) == {"synthesis", "calibration", "reconstruction", "finetune", "total"}
    # fast = synthesis, calibration and block-wise reconstruction of both blocks
    assert [u["unit"] for u in summary["curves"]["reconstruction"]] == ["blocks.0", "blocks.1"]
    json.dumps(summary)  # JSON-serializable for the manifest / report
    # The teacher classifies the synthetic images as their targets (what CE optimizes).
    images, labels = [], []
    for f in sorted((tmp_path / "dfq" / "round000").glob("batch*.safetensors")):
        t = load_file(str(f))
        images.append(t["images"].float())
        labels.append(t["labels"])
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (256, 1, 16, 16) and images.dtype == torch.float32
    lo, hi = -0.1307 / 0.3081, (1 - 0.1307) / 0.3081
    assert images.min() >= lo - 1e-2 and images.max() <= hi + 1e-2  # clamped to valid pixels (fp16 storage)
    with torch.no_grad():
        acc = (fp(images).argmax(1) == labels).float().mean().item()
        # int8 Q tracks P on the images it was calibrated on: SQNR of the logits
        p_out, q_out = fp(images), q(images)
    assert acc >= 0.9
    assert sqnr_db(p_out, q_out) >= 20.0
    # progress: stages in order, step <= total, losses reported
    stages = [e["stage"] for e in events]
    assert stages[0] == "synthesis" and stages[-1] == "reconstruction"
    assert all(0 < e["step"] <= e["total"] for e in events if e["stage"] == "synthesis")
    assert {"ce", "interhead", "tv", "mask", "entropy", "total"} <= set(events[5]["losses"])
    png = Path(summary["paths"]["images"][0])
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] >= 16 * 16 and im.mode == "RGB"  # 16 x 16 grid of upscaled images


def test_teacher_is_frozen_and_never_receives_gradients():
    fp, q = tiny_models()
    fp_before = q_state(fp)
    teacher = make_teacher(fp, q)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p.data_ptr() == t.data_ptr() for p in teacher.parameters() for t in q.parameters())
    t_before = q_state(teacher)
    from maskaq_deploy.calib.calibrate import calibrate_observers

    calibrate_observers(q, lambda m: m(torch.randn(8, 1, 16, 16)))
    cfg = DFQConfig.from_dict({"iterations": 3, "batch_size": 4, "epochs": 1, "ft_batch_size": 4})
    setup = SynthesisSetup(teacher, q, token_layout(teacher), cfg, "maskaq", torch.device("cpu"), (1, 16, 16),
                           torch.full((1, 1, 1, 1), 0.13), torch.full((1, 1, 1, 1), 0.31), None)
    q_params_before = q_state(q)
    imgs, _, _ = synthesize_batch(setup, torch.arange(4), seed=0)
    assert all(p.grad is None for p in q.parameters())  # Q frozen during synthesis ...
    assert_same_state(q_params_before, q_state(q))
    opt = make_optimizer(q, cfg)
    finetune_epoch(teacher, q, opt, imgs, None, cfg, token_layout(teacher), 0, torch.device("cpu"), None)
    assert any(p.grad is not None for p in q.parameters())  # ... and trained in fine-tuning
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in fp.parameters())
    assert_same_state(t_before, q_state(teacher))
    assert_same_state(fp_before, q_state(fp))


def test_soft_labels_move_the_images_toward_each_images_second_class(trained_state):
    """The same seed with soft targets: the teacher gives each image's second class (the one its target names)
    a clearly higher probability than on the hard-label images (40 steps: 0.027 -> 0.069 when written)."""
    from maskaq_deploy.calib.dfq import losses as L
    from maskaq_deploy.calib.dfq.state import derive_seed

    fp, q = tiny_models(state=trained_state)
    teacher = make_teacher(fp, q)
    labels = torch.arange(10).repeat(2)
    other = L.soft_targets(labels, 10, 0.5, torch.Generator().manual_seed(derive_seed(0, "soft labels")))
    other[torch.arange(20), labels] = 0
    other = other.argmax(1)
    p_other = {}
    for mix in (0.0, 0.5):
        cfg = DFQConfig.from_dict({"iterations": 40, "batch_size": 20, "soft_label_mix": mix, "w_mask": 0.0})
        setup = SynthesisSetup(teacher, None, token_layout(teacher), cfg, "maskaq", torch.device("cpu"),
                               (1, 16, 16), torch.full((1, 1, 1, 1), 0.13), torch.full((1, 1, 1, 1), 0.31), None)
        imgs, _, _ = synthesize_batch(setup, labels, seed=0)
        with torch.no_grad():
            p_other[mix] = teacher(imgs).softmax(1)[torch.arange(20), other]
    assert p_other[0.5].mean() > 2 * p_other[0.0].mean(), p_other
    assert (p_other[0.5] > p_other[0.0]).float().mean() >= 0.7


def test_same_seed_gives_the_same_model_and_another_seed_does_not(tmp_path):
    a = tiny_models()
    run(a, tmp_path / "a")
    b = tiny_models()
    run(b, tmp_path / "b")
    assert_same_state(q_state(a[1]), q_state(b[1]))
    for f in ("round001/batch00002.safetensors", "finetune.safetensors"):
        ta, tb = load_file(str(tmp_path / "a/dfq" / f)), load_file(str(tmp_path / "b/dfq" / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = tiny_models()
    run(c, tmp_path / "c", seed=1)
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(q_state(a[1])[w], q_state(c[1])[w])


def test_guarded_finetune_backs_off_a_fine_tune_that_only_hurts(tmp_path):
    # ft_lr 5 wrecks Q in one epoch: the held-out KL rises, patience 1 stops the fine-tune after that epoch and
    # the run ends with Q as it was before fine-tuning, i.e. exactly the Q of the same run without a fine-tune.
    before = tiny_models()
    run(before, tmp_path / "no-finetune", epochs=0, refresh_every=0)
    guarded = tiny_models()
    s = run(guarded, tmp_path / "guarded", ft_lr=5.0, refresh_every=0, ft_patience=1)
    curve = s["curves"]["finetune"]
    assert [c["epoch"] for c in curve] == [0]  # epochs 2 and 3 were not run
    assert s["final_losses"]["finetune"]["kept_epoch"] == 0
    assert_same_state(q_state(before[1]), q_state(guarded[1]))
    # the same wreck without a guard keeps the last epoch
    unguarded = tiny_models()
    run(unguarded, tmp_path / "unguarded", ft_lr=5.0, refresh_every=0, ft_holdout=0.0)
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(q_state(before[1])[w], q_state(unguarded[1])[w])


def test_guarded_finetune_keeps_the_epoch_with_the_lowest_held_out_kl(tmp_path):
    from maskaq_deploy.calib.dfq.finetune import holdout_kl

    fp, q = tiny_models()
    s = run((fp, q), tmp_path, refresh_every=0, ft_lr=0.02)
    kls = [c["holdout_kl"] for c in s["curves"]["finetune"]]
    kept, kept_kl = s["final_losses"]["finetune"]["kept_epoch"], s["final_losses"]["finetune"]["kept_holdout_kl"]
    assert len(kls) == 3 and kept_kl <= min(kls) and (kept == 0 or kls[kept - 1] == kept_kl)
    held = load_file(str(tmp_path / "dfq" / "holdout.safetensors"))["images"]
    assert held.shape[0] == 6  # 25% of 24
    # the Q the run returns is the kept one: its held-out KL is the kept value
    assert holdout_kl(make_teacher(fp, q), q, held, DFQConfig.from_dict(SMALL), torch.device("cpu"), None) == \
        pytest.approx(kept_kl, rel=1e-5)


CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_dfq import tiny_models, run
    torch.set_num_threads(1)
    def slow(event):
        # give the parent time to kill us mid-run (between the two reconstructed blocks, or mid-synthesis)
        time.sleep(1.0 if event["stage"] == "reconstruction" else 0.02)
    if {workers} > 1:  # the worker making the last batch of the first set is still busy when the parent dies
        from maskaq_deploy.calib.dfq.rounds import SynthesisRounds
        one = SynthesisRounds._one
        SynthesisRounds._one = lambda self, rnd, b, *a: (time.sleep(60) if (rnd, b) == (0, 2) else None) or \
            one(self, rnd, b, *a)
    fp, q = tiny_models()
    from maskaq_deploy.calib.dfq import DFQConfig, run_calibration
    from test_dfq import SMALL, DATA
    run_calibration(fp, q, method="maskaq", config=DFQConfig.from_dict(SMALL), data_config=DATA, run_dir={run_dir!r},
                    progress=slow, synthesis_workers={workers})
""")


@pytest.mark.parametrize("trigger,workers", [("round000/batch00001.safetensors", 1),
                                             ("round000/batch00001.safetensors", 2),
                                             ("reconstructed.safetensors", 1), ("round001/batch00000.safetensors", 1)],
                         ids=["during-first-synthesis", "during-synthesis-in-workers", "during-reconstruction",
                              "during-refresh"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, trigger, workers):
    ref = tiny_models()
    ref_summary = run(ref, tmp_path / "ref")
    run_dir = tmp_path / "killed"
    code = CHILD.format(tests=str(Path(__file__).parent), run_dir=str(run_dir), workers=workers)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    target = run_dir / "dfq" / trigger
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"child ended before the kill point: {proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_for_no_process_running(code), "a synthesis worker outlived its killed parent"
    meta = json.loads((run_dir / "dfq" / "run.json").read_text())
    assert not meta.get("completed")
    if trigger == "reconstructed.safetensors":  # killed between the two blocks: the resume redoes only the second
        from safetensors import safe_open

        with safe_open(str(target), framework="pt") as f:
            assert json.loads(f.metadata()["info"])["units_done"] == 1
    resumed = tiny_models()
    summary = run(resumed, run_dir, resume=True)
    assert summary["resumed"] is True
    assert_same_state(q_state(ref[1]), q_state(resumed[1]))
    assert summary["final_losses"]["finetune"] == pytest.approx(ref_summary["final_losses"]["finetune"], rel=0,
                                                                abs=0)


def wait_for_no_process_running(code: str, timeout_s: float = 10.0) -> bool:
    """Whether every process whose command line holds ``code`` (the child and the workers it forked) is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if code.encode() in cmdline.read_bytes():
                    alive.append(cmdline)
            except OSError:  # the process ended while we looked
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


WORKERS_CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_dfq import tiny_models, run
    torch.set_num_threads(1)
    fp, q = tiny_models()
    summary = run((fp, q), {run_dir!r}, synthesis_workers=2)
    torch.save(q.state_dict(), {run_dir!r} + "/q.pt")
    print(json.dumps({{k: summary[k] for k in ("synthesis_workers", "final_losses")}}))
""")


def test_synthesis_workers_make_the_same_images_and_model_as_one_process(tmp_path):
    # Each batch is made at one torch thread in either case, so the pixels and the calibrated, reconstructed
    # and fine-tuned Q are bit-identical; both synthesis rounds (the first set and the refresh) go to workers.
    # The worker run has a process of its own: earlier tests in this one may have made fork unusable (below).
    code = WORKERS_CHILD.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path / "two"))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    two = json.loads(child.stdout.strip().splitlines()[-1])
    assert two["synthesis_workers"] == 2  # the workers made every batch
    one = tiny_models()
    s1 = run(one, tmp_path / "one", synthesis_workers=1)
    assert s1["synthesis_workers"] == 1
    files = sorted((tmp_path / "two/dfq").glob("round*/batch*.safetensors"))
    assert files
    for f in files:
        ta, tb = load_file(str(tmp_path / "one/dfq" / f.parent.name / f.name)), load_file(str(f))
        assert all(torch.equal(ta[k], tb[k]) for k in ("images", "labels")), f.name
    assert_same_state(q_state(one[1]), torch.load(tmp_path / "two/q.pt"))
    assert json.loads(json.dumps(s1["final_losses"])) == two["final_losses"]


def test_synthesis_falls_back_to_this_process_when_forked_workers_cannot_run_autograd(tmp_path, monkeypatch,
                                                                                      caplog):
    # After some operations (an ONNX export of a quantized model, for one) a forked child cannot run autograd;
    # the workers say so and the run makes the batches itself, at one thread: the same images.
    from maskaq_deploy.calib.dfq import workers

    one = tiny_models()
    run(one, tmp_path / "one", synthesis_workers=1, epochs=0, refresh_every=0, ft_holdout=0.0)
    monkeypatch.setattr(workers, "_autograd_problem", lambda: "autograd is unusable here")
    two = tiny_models()
    s2 = run(two, tmp_path / "two", synthesis_workers=2, epochs=0, refresh_every=0, ft_holdout=0.0)
    assert s2["synthesis_workers"] == 1
    assert "synthesis workers unavailable in this process (autograd is unusable here)" in caplog.text
    for f in sorted((tmp_path / "one/dfq").glob("round000/batch*.safetensors")):
        assert torch.equal(load_file(str(f))["images"],
                           load_file(str(tmp_path / "two/dfq/round000" / f.name))["images"]), f.name
    assert_same_state(q_state(one[1]), q_state(two[1]))


def test_synthesis_stays_in_this_process_when_one_batch_at_a_time_is_all_that_fits(tmp_path, monkeypatch):
    from maskaq_deploy.calib.dfq import workers

    monkeypatch.setattr(workers, "available_memory", lambda: 1 << 20)  # 1 MiB: not even one batch "fits"
    s = run(tiny_models(), tmp_path / "capped", synthesis_workers=2, epochs=0, refresh_every=0, ft_holdout=0.0)
    assert s["synthesis_workers"] == 1 and s["final_losses"]["synthesis"]["total"] == pytest.approx(
        run(tiny_models(), tmp_path / "one", synthesis_workers=1, epochs=0, refresh_every=0,
            ft_holdout=0.0)["final_losses"]["synthesis"]["total"], rel=0, abs=0)


def test_resume_with_a_different_config_is_refused(tmp_path, monkeypatch):
    from maskaq_deploy.calib.dfq import rounds

    run(tiny_models(), tmp_path, epochs=0, refresh_every=0)
    with pytest.raises(ResumeError, match="different config"):
        run(tiny_models(), tmp_path, resume=True, epochs=0, refresh_every=0, iterations=5)
    # a completed run resumes to the same model without recomputing: no image is synthesized again
    a, b = tiny_models(), tiny_models()
    run(a, tmp_path / "x", epochs=0, refresh_every=0)
    synthesized = []
    synthesize_batch = rounds.synthesize_batch
    monkeypatch.setattr(rounds, "synthesize_batch", lambda *args: synthesized.append(1) or synthesize_batch(*args))
    s = run(b, tmp_path / "x", resume=True, epochs=0, refresh_every=0)
    assert s["resumed"] and synthesized == []
    assert_same_state(q_state(a[1]), q_state(b[1]))


@pytest.mark.parametrize("method", ["noise", "psaq", "real"])
def test_baselines_calibrate_through_the_same_entry(tmp_path, method):
    fp, q = tiny_models("w8a8")
    summary = run((fp, q), tmp_path, method=method, epochs=1, refresh_every=0)
    assert all_calibrated(q)
    assert summary["method"] == method and summary["num_images"] == 24
    # noise and psaq are calibration-only whatever the config says; real fine-tunes when asked
    assert bool(summary["curves"]["finetune"]) == (method == "real")
    assert (summary["rounds"], bool(summary["curves"]["synthesis"])) == \
        ({"noise": (0, False), "psaq": (1, True), "real": (0, False)}[method])
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        p, qq = fp(x), q(x)
    assert sqnr_db(p, qq) >= 15.0


def test_real_method_needs_images(tmp_path):
    fp, q = tiny_models()
    from maskaq_deploy.calib.dfq import DFQConfigError

    with pytest.raises(DFQConfigError, match="needs real images"):
        run_calibration(fp, q, method="real", config=DFQConfig(), data_config=DATA, run_dir=tmp_path)
    with pytest.raises(DFQConfigError, match="unknown calibration method"):
        run_calibration(fp, q, method="magic", config=DFQConfig(), data_config=DATA, run_dir=tmp_path)


@pytest.mark.parametrize("arch", ["swin", "deit_distilled", "avgpool"])
def test_other_token_layouts_run(tmp_path, arch):
    import timm

    small = {"img_size": 16, "embed_dim": 16}
    name, kw = {
        "swin": ("swin_tiny_patch4_window7_224",
                 {**small, "patch_size": 2, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2)}),
        "deit_distilled": ("deit_tiny_distilled_patch16_224", {**small, "patch_size": 4, "depth": 1, "num_heads": 2}),
        "avgpool": ("vit_tiny_patch16_224", {**small, "patch_size": 4, "depth": 1, "num_heads": 2,
                                             "class_token": False, "global_pool": "avg"}),
    }[arch]
    torch.manual_seed(0)
    fp = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10, **kw).eval()
    q = copy.deepcopy(fp)
    attach_quantizers(q, RECIPES["w4a8"])
    lay = token_layout(fp)
    assert (lay.num_prefix, lay.has_cls, lay.windowed) == {
        "swin": (0, False, True), "deit_distilled": (2, True, False), "avgpool": (0, False, False)}[arch]
    s = run_calibration(fp, q, method="maskaq", config=DFQConfig.from_dict({**SMALL, "epochs": 1, "refresh_every": 0}),
                        data_config=DATA, run_dir=tmp_path)
    losses = s["final_losses"]["synthesis"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert {"ce", "interhead", "mask", "entropy", "tv"} <= set(losses)
    assert all_calibrated(q)
