"""The TensorRT deployment bundle, its build script and verify script, and the TensorRT entry points without
TensorRT (CPU only: the engine itself is covered by tests/gpu/test_tensorrt_engine.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskaq_deploy.calib.recipes import RECIPES
from maskaq_deploy.export import bundle as B
from maskaq_deploy.export.tensorrt import (EngineBuildError, EngineUnavailable, build_engine, profile_shapes,
                                           read_model_io)
from maskaq_deploy.runtimes.errors import BackendUnavailable
from maskaq_deploy.runtimes.tensorrt_backend import TensorRTBackend, plan_batches

CHW, CLASSES = (3, 8, 8), 10
TEMPLATE = Path(B.__file__).parent / "templates" / "verify_engine.py"


def make_qdq_onnx(path: Path, *, batch="batch", int4: bool = False, seed: int = 0) -> Path:
    """images (N, 3, 8, 8) -> Flatten -> [Q/DQ int8] -> MatMul(DQ weights) + bias -> logits (N, 10).

    int8: per-channel int8 weights and a per-tensor int8 activation Q/DQ (the w8a8 pattern);
    int4: block-wise INT4 weights (block 64 along K) and float activations (the w4a16 pattern).
    """
    rng = np.random.default_rng(seed)
    k = int(np.prod(CHW))
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1)]
    if int4:
        wq = rng.integers(-8, 8, (k, CLASSES)).astype(np.int8)
        scale = (rng.random((k // 64, CLASSES)) * 0.02 + 0.01).astype(np.float32)
        inits = [helper.make_tensor("w_q", TensorProto.INT4, wq.shape, wq.flatten().tolist()),
                 numpy_helper.from_array(scale, "w_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0, block_size=64))
        act = "flat"
    else:
        wq = rng.integers(-127, 128, (k, CLASSES)).astype(np.int8)
        scale = (rng.random(CLASSES) * 0.002 + 0.001).astype(np.float32)
        inits = [numpy_helper.from_array(wq, "w_q"), numpy_helper.from_array(scale, "w_scale"),
                 numpy_helper.from_array(np.array(0.03, np.float32), "a_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "a_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["flat", "a_scale", "a_zp"], ["flat_q"]),
                  helper.make_node("DequantizeLinear", ["flat_q", "a_scale", "a_zp"], ["flat_dq"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1)]
        act = "flat_dq"
    inits.append(numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "bias"))
    nodes += [helper.make_node("MatMul", [act, "w"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny_qdq", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, *CHW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # make_model's default may be newer than onnxruntime reads
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def qdq_onnx(tmp_path):
    return make_qdq_onnx(tmp_path / "model.onnx")


@pytest.fixture
def images():
    return np.random.default_rng(1).standard_normal((12, *CHW)).astype(np.float32)


MANIFEST = {"model": {"timm_name": "tiny_test"}, "recipe": RECIPES["w8a8"].to_dict()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"images": x})[0]


# ---- bundle contents, manifest, golden files ---------------------------------------------------------------

def test_bundle_files_and_manifest_hashes(tmp_path, qdq_onnx, images):
    out = tmp_path / "out"
    bundle = B.write_bundle(out, qdq_onnx, images, manifest=MANIFEST, max_batch=4, workspace_mib=512)
    assert bundle == out / "bundle"
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(["model.qdq.onnx", "build_engine.sh", "golden_inputs.npz", "golden_outputs.npz",
                            "verify_engine.py", "manifest.json", "README.md"])
    assert [p.name for p in out.iterdir()] == ["bundle"]  # no temporary directory left behind
    m = json.loads((bundle / "manifest.json").read_text())
    assert set(m["files"]) == set(names) - {"manifest.json"}
    for name, digest in m["files"].items():
        assert sha256(bundle / name) == digest, name
    assert sha256(bundle / "model.qdq.onnx") == sha256(qdq_onnx)
    assert (bundle / "verify_engine.py").read_text() == TEMPLATE.read_text()
    assert os.stat(bundle / "build_engine.sh").st_mode & stat.S_IXUSR
    assert os.stat(bundle / "verify_engine.py").st_mode & stat.S_IXUSR
    assert all(os.stat(p).st_mode & stat.S_IROTH for p in [bundle, *bundle.iterdir()])  # not private temp modes
    assert m["model"] == MANIFEST["model"] and m["recipe"]["name"] == "w8a8"
    assert m["input"] == {"name": "images", "shape": [None, *CHW], "dtype": "float32"}
    assert m["output"] == {"name": "logits", "shape": [None, CLASSES]}
    assert m["tensorrt"]["profile"] == {"min": [1, *CHW], "opt": [4, *CHW], "max": [4, *CHW]}
    assert m["tensorrt"]["flavour"] == "tensorrt" and m["tensorrt"]["int4_weights"] is False
    # a graph without the exporter's metadata: float32, INT8, attention as given
    assert (m["tensorrt"]["float_dtype"], m["tensorrt"]["fp8"], m["tensorrt"]["min_compute_capability"]) == \
        ("fp32", False, None)
    assert m["golden"]["count"] == len(images)
    assert "--stronglyTyped" in m["commands"]["trtexec_10"]
    assert "--stronglyTyped" not in m["commands"]["trtexec_11"]
    assert m["commands"]["build"] == "bash build_engine.sh"


def test_golden_files_round_trip(tmp_path, qdq_onnx, images):
    bundle = B.write_bundle(tmp_path, qdq_onnx, images, manifest=MANIFEST)
    with np.load(bundle / "golden_inputs.npz") as f:
        np.testing.assert_array_equal(f["inputs"], images)
    with np.load(bundle / "golden_outputs.npz") as f:
        golden = f["logits"]
    assert golden.shape == (len(images), CLASSES) and golden.dtype == np.float32
    np.testing.assert_allclose(golden, ort_logits(bundle / "model.qdq.onnx", images), rtol=0, atol=1e-5)


def test_static_batch_graph_is_run_in_its_batch_and_gets_no_profile(tmp_path, images):
    path = make_qdq_onnx(tmp_path / "static.onnx", batch=5)
    bundle = B.write_bundle(tmp_path / "o", path, images, manifest=MANIFEST)  # 12 images = 5 + 5 + 2 padded
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["tensorrt"]["profile"] is None and m["input"]["shape"] == [5, *CHW]
    assert "Shapes" not in m["commands"]["trtexec_10"]
    padded = np.zeros((15, *CHW), np.float32)
    padded[:12] = images
    expected = np.concatenate([ort_logits(path, padded[i:i + 5]) for i in (0, 5, 10)])[:12]
    with np.load(bundle / "golden_outputs.npz") as f:
        np.testing.assert_allclose(f["logits"], expected, rtol=0, atol=1e-5)


def test_int4_golden_outputs_keep_float_accuracy(tmp_path, images):
    path = make_qdq_onnx(tmp_path / "int4.onnx", int4=True)
    bundle = B.write_bundle(tmp_path / "o", path, images, manifest=MANIFEST)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["tensorrt"]["int4_weights"] is True
    # reference: the dequantized INT4 weights in float64
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits["w_q"].astype(np.float64) * np.repeat(inits["w_scale"], 64, axis=0)
    ref = images.reshape(len(images), -1).astype(np.float64) @ w + inits["bias"]
    with np.load(bundle / "golden_outputs.npz") as f:
        np.testing.assert_allclose(f["logits"], ref, rtol=0, atol=1e-4)  # int8-quantized activations: ~1e-2


def test_rewrite_replaces_the_bundle(tmp_path, qdq_onnx, images):
    B.write_bundle(tmp_path, qdq_onnx, images, manifest=MANIFEST)
    bundle = B.write_bundle(tmp_path, qdq_onnx, images[:3], manifest={**MANIFEST, "note": "second"})
    assert json.loads((bundle / "manifest.json").read_text())["note"] == "second"
    with np.load(bundle / "golden_inputs.npz") as f:
        assert len(f["inputs"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "model.onnx"]


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 9, 9), np.float32), "image shape"),
    (np.zeros((3, 8, 8), np.float32), r"\(N, C, H, W\)"),
    (np.full((1, *CHW), np.nan, np.float32), "NaN"),
])
def test_bad_golden_inputs_are_refused_and_nothing_written(tmp_path, qdq_onnx, bad, match):
    with pytest.raises(B.BundleError, match=match):
        B.write_bundle(tmp_path / "o", qdq_onnx, bad, manifest=MANIFEST)
    assert not (tmp_path / "o" / "bundle").exists()


# ---- trtexec commands and build_engine.sh -------------------------------------------------------------------

def test_trtexec_args_differ_by_version(qdq_onnx):
    io = read_model_io(qdq_onnx)
    prof = profile_shapes(io, 1, 8, 16)
    common = ["--onnx=model.qdq.onnx", "--saveEngine=model.engine", "--minShapes=images:1x3x8x8",
              "--optShapes=images:8x3x8x8", "--maxShapes=images:16x3x8x8", "--shapes=images:8x3x8x8"]
    assert B.trtexec_args(10, io, prof) == common + ["--stronglyTyped"]
    assert B.trtexec_args(10, io, prof, weak_typing=True) == common + ["--int8", "--fp16"]
    assert B.trtexec_args(11, io, prof) == common  # 11.x: strongly typed always, no precision flags exist
    assert B.trtexec_command(11, io, prof).startswith("trtexec --onnx=model.qdq.onnx ")
    with pytest.raises(ValueError, match="TensorRT 8"):
        B.trtexec_args(8, io, prof)


FAKE_TRTEXEC = """#!/bin/sh
if [ "$1" = "--version" ]; then
  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$FAKE_VERSION] [b9] # trtexec --version"
  echo "[E] Model missing or format not recognized"
  exit 1
fi
printf '%s\\n' "$@" > "$FAKE_LOG"
[ -n "$FAKE_FAIL" ] && exit 1
for a in "$@"; do
  case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}" ;; esac
done
exit 0
"""


@pytest.fixture
def script_bundle(tmp_path, qdq_onnx, images):
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    bundle = B.write_bundle(tmp_path / "out", qdq_onnx, images[:2], manifest=MANIFEST, max_batch=4)
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    return bundle, fake


def run_script(bundle: Path, fake: Path, version: str, *args, on_path=False, **env):
    log = bundle.parent / "trtexec.args"
    full = {**os.environ, "FAKE_VERSION": version, "FAKE_LOG": str(log), **env}
    full.pop("TRTEXEC", None)
    if on_path:
        full["PATH"] = f"{fake.parent}{os.pathsep}{full['PATH']}"
    else:
        full["TRTEXEC"] = str(fake)
    proc = subprocess.run(["bash", str(bundle / "build_engine.sh"), *args], env=full, capture_output=True,
                          text=True, timeout=60, check=False)
    called = log.read_text().splitlines() if log.exists() else None
    return proc, called


@pytest.mark.parametrize("version", ["101303", "100300", "10.8.0.43"])
def test_build_script_takes_the_10x_branch(script_bundle, version):
    bundle, fake = script_bundle
    proc, args = run_script(bundle, fake, version)
    assert proc.returncode == 0, proc.stderr
    assert "--stronglyTyped" in args and "--int8" not in args
    assert "--minShapes=images:1x3x8x8" in args and "--maxShapes=images:4x3x8x8" in args
    assert "--onnx=model.qdq.onnx" in args
    assert (bundle / "model.engine").read_text() == "engine\n"
    assert not (bundle / ".model.engine.partial").exists()


@pytest.mark.parametrize("version", ["110100", "110000", "11.1.0.106"])
def test_build_script_takes_the_11x_branch(script_bundle, version):
    bundle, fake = script_bundle
    proc, args = run_script(bundle, fake, version, on_path=True)
    assert proc.returncode == 0, proc.stderr
    assert not {"--stronglyTyped", "--int8", "--fp16", "--int4"} & set(args)
    assert "--shapes=images:4x3x8x8" in args
    assert (bundle / "model.engine").exists()


def test_build_script_options_and_passthrough(script_bundle, tmp_path):
    bundle, fake = script_bundle
    proc, args = run_script(bundle, fake, "101000", "--verbose", TRT10_TYPING="weak",
                            TIMING_CACHE=str(tmp_path / "t.cache"), WORKSPACE_MIB="256")
    assert proc.returncode == 0, proc.stderr
    assert "--int8" in args and "--fp16" in args and "--stronglyTyped" not in args
    assert f"--timingCacheFile={tmp_path / 't.cache'}" in args
    assert "--memPoolSize=workspace:256" in args and args[-1] == "--verbose"


def test_build_script_refuses_old_tensorrt_and_failed_builds(script_bundle):
    bundle, fake = script_bundle
    proc, args = run_script(bundle, fake, "8601")
    assert proc.returncode == 2 and "needs TensorRT 10.x or 11.x" in proc.stderr and args is None
    proc, args = run_script(bundle, fake, "110100", FAKE_FAIL="1")
    assert proc.returncode != 0 and args is not None
    assert not (bundle / "model.engine").exists()


def fp8_bundle(tmp_path, images) -> Path:
    """The tiny graph with its int8 Q/DQ turned into FP8 E4M3 ones (zero points float8, weights float8)."""
    from maskaq_deploy.export.lowering import float8_initializer

    model = onnx.load(make_qdq_onnx(tmp_path / "int8.onnx"))
    inits = []
    for t in model.graph.initializer:
        if t.name in ("w_q", "a_zp"):
            t = float8_initializer(t.name, np.clip(numpy_helper.to_array(t).astype(np.float32), -448, 448))
        inits.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    model.metadata_props.add(key="maskaq.float_dtype", value="fp16")  # as the exporter records it
    onnx.save(model, tmp_path / "fp8.onnx")
    return B.write_bundle(tmp_path / "out8", tmp_path / "fp8.onnx", images[:2], manifest=MANIFEST, max_batch=4)


@pytest.mark.parametrize("cc, code", [("8.7", 3), ("7.2", 3), ("8.9", 0), ("9.0", 0), ("10.0", 0)])
def test_fp8_build_script_checks_compute_capability(tmp_path, images, script_bundle, cc, code):
    _, fake = script_bundle
    bundle = fp8_bundle(tmp_path, images)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["tensorrt"]["fp8"] is True and m["tensorrt"]["min_compute_capability"] == "8.9"
    assert m["tensorrt"]["float_dtype"] == "fp16"
    proc, args = run_script(bundle, fake, "110100", COMPUTE_CAPABILITY=cc)
    assert proc.returncode == code, proc.stderr
    if code:
        assert args is None and len(proc.stderr.strip().splitlines()) == 1
        assert f"this GPU is {cc}" in proc.stderr and "8.9 or later" in proc.stderr
    else:
        assert "--onnx=model.qdq.onnx" in args


def test_fp8_build_script_reads_nvidia_smi(tmp_path, images, script_bundle):
    _, fake = script_bundle
    bundle = fp8_bundle(tmp_path, images)
    smi = fake.parent / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 8.7\n")
    smi.chmod(0o755)
    proc, args = run_script(bundle, fake, "110100", on_path=True)
    assert proc.returncode == 3 and "this GPU is 8.7" in proc.stderr and args is None


def test_int8_build_script_skips_the_compute_capability_check(script_bundle):
    bundle, fake = script_bundle
    proc, args = run_script(bundle, fake, "110100", COMPUTE_CAPABILITY="7.2")
    assert proc.returncode == 0, proc.stderr


def test_readme_says_how_to_compare_attention_engines(tmp_path, qdq_onnx, images):
    bundle = B.write_bundle(tmp_path / "out", qdq_onnx, images[:2], manifest=MANIFEST, max_batch=4)
    text = (bundle / "README.md").read_text()
    assert "--attention-qdq off" in text and B.ATTENTION_OFF_ONNX in text
    assert "trtexec --onnx=model.qdq.onnx" in text and f"trtexec --onnx={B.ATTENTION_OFF_ONNX}" in text
    assert "GPU Compute Time" in text and "compute capability" not in text
    fp8_text = (fp8_bundle(tmp_path, images) / "README.md").read_text()
    assert "FP8 (E4M3)" in fp8_text and "8.9 or later" in fp8_text and "fp16" in fp8_text


# ---- verify_engine.py --------------------------------------------------------------------------------------

def load_verify(path: Path):
    spec = importlib.util.spec_from_file_location("verify_engine_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_metrics():
    v = load_verify(TEMPLATE)
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    m = v.compare(ref, ref)
    assert m["agreement"] == 1.0 and m["max_abs_err"] == 0.0 and m["sqnr_db"] == float("inf")
    assert m["cosine"] == pytest.approx(1.0)
    test = ref.copy()
    test[1] = [0.0, 1.0, 2.5]  # second row flips its top-1
    m = v.compare(ref, test)
    assert m["agreement"] == 0.5 and m["max_abs_err"] == 1.5
    assert m["sqnr_db"] == pytest.approx(20 * np.log10(np.sqrt(15) / np.sqrt(3.25)))
    assert v.failures(m, 0.99) == ["top-1 agreement 0.5000 < 0.99"]
    assert len(v.failures(m, 0.5, min_sqnr_db=30, max_abs_err=1.0)) == 2
    with pytest.raises(ValueError):
        v.compare(ref, ref[:1])
    assert v.batch_runs(10, 2, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert v.batch_runs(3, 4, 4) == [(0, 3, 4)]


@pytest.fixture
def bundle_with_ort(tmp_path, qdq_onnx, images):
    bundle = B.write_bundle(tmp_path, qdq_onnx, images, manifest=MANIFEST)
    v = load_verify(bundle / "verify_engine.py")
    sess = ort.InferenceSession(str(bundle / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    return bundle, v, (lambda x: sess.run(["logits"], {"images": x})[0])


def test_verify_script_passes_with_an_onnxruntime_engine(bundle_with_ort, capsys):
    _, v, runner = bundle_with_ort
    assert v.main([], runner=runner) == 0  # default paths: the files next to the script
    out = capsys.readouterr().out
    assert "top-1 agreement 1.0000" in out and out.strip().endswith("PASS")


def test_verify_script_fails_on_perturbed_outputs(bundle_with_ort, capsys):
    bundle, v, runner = bundle_with_ort
    with np.load(bundle / "golden_outputs.npz") as f:
        logits = f["logits"]
    bad = bundle.parent / "bad_outputs.npz"
    np.savez(bad, logits=np.roll(logits, 1, axis=1))  # every top-1 moves
    assert v.main(["--outputs", str(bad)], runner=runner) == 1
    assert "FAIL: top-1 agreement" in capsys.readouterr().out
    noisy = bundle.parent / "noisy_outputs.npz"
    np.savez(noisy, logits=logits + 1e-3 * np.sign(logits))  # same top-1, finite SQNR
    assert v.main(["--outputs", str(noisy)], runner=runner) == 0
    assert v.main(["--outputs", str(noisy), "--min-sqnr-db", "200"], runner=runner) == 1


def test_verify_script_reports_an_engine_that_cannot_run(bundle_with_ort, capsys):
    _, v, _ = bundle_with_ort

    def broken(x):
        raise v.EngineRunError("no GPU")

    assert v.main([], runner=broken) == 2
    assert "cannot run the engine: no GPU" in capsys.readouterr().err


def test_verify_script_runs_standalone_without_tensorrt(bundle_with_ort):
    bundle, _, _ = bundle_with_ort
    env = {**os.environ, "PYTHONPATH": ""}
    code = ("import sys; sys.modules['tensorrt'] = None; "
            "import runpy; runpy.run_path('verify_engine.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=bundle, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "tensorrt Python package is not importable" in proc.stderr


# ---- TensorRT entry points without TensorRT ----------------------------------------------------------------

def test_build_engine_without_tensorrt_is_engine_unavailable(tmp_path, qdq_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    with pytest.raises(EngineUnavailable, match="tensorrt Python package is not importable.*build_engine.sh"):
        build_engine(qdq_onnx, tmp_path / "out")
    assert not (tmp_path / "out" / "model.engine").exists()


def test_build_engine_wrong_version_or_no_gpu(tmp_path, qdq_onnx, monkeypatch):
    import torch

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(EngineUnavailable, match="TensorRT 8.6.1 found.*10.x or 11.x"):
        build_engine(qdq_onnx, tmp_path)
    fake.__version__ = "10.13.3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineUnavailable, match="no CUDA GPU"):
        build_engine(qdq_onnx, tmp_path)


def test_build_engine_checks_its_inputs_before_tensorrt(tmp_path, qdq_onnx):
    with pytest.raises(EngineBuildError, match="not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        build_engine(qdq_onnx, tmp_path, min_batch=8, max_batch=4)


def test_tensorrt_backend_unavailable_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = TensorRTBackend.available()
    assert not ok and "tensorrt Python package" in why
    with (pytest.raises(BackendUnavailable, match="tensorrt backend is not available: the tensorrt Python"),
          TensorRTBackend(tmp_path / "model.engine")):
        pass


def test_plan_batches_splits_and_pads():
    assert plan_batches(10, 1, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert plan_batches(3, 8, 8) == [(0, 3, 8)]  # static batch 8: pad
    assert plan_batches(5, 2, 32) == [(0, 5, 5)]
    assert plan_batches(0, 1, 4) == []
    with pytest.raises(ValueError):
        plan_batches(4, 0, 4)
