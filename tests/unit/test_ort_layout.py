"""The onnxruntime flavour's integer layout per CPU family, and what the runtime says about the kernels it took.

Same marker graph as test_registry.py (a traced Linear layer); numerics against its numpy fake-quant reference.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from maskaq_deploy.export import ortcpu
from maskaq_deploy.export.errors import ExportError
from maskaq_deploy.export.qdq import insert_qdq
from maskaq_deploy.runtimes import cpu
from maskaq_deploy.runtimes.bench import kernel_summary, profile_ops
from maskaq_deploy.runtimes.compare import sqnr_db
from maskaq_deploy.runtimes.ort_backend import OrtBackend, exported_metadata, layout_mismatch
from tests.unit.test_registry import _act, _bias, _weight, linear_graph, ops, reference, run

HERE = cpu.detect()


@pytest.fixture(scope="module")
def x():
    # activations spanning the whole grid, so u8 x s8 pair sums would overflow 16 bits where they can
    return (np.random.default_rng(7).standard_normal((2, 5, 32)) * 4).astype(np.float32)


def _lowered(family):
    m = linear_graph()
    a, w = _act(), _weight()  # full-range int8 weight codes, -128..127
    insert_qdq(m, {a.name: a, w.name: w}, "onnxruntime", cpu=family)
    return m, a, w


def _init(m, suffix):
    return next((numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith(suffix)), None)


def _mif(m):
    return next(n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat")


@pytest.mark.parametrize("family,act_dtype,act_zp,w_dtype", [
    ("x86-vnni", np.uint8, 128, np.int8),
    ("x86-avx2", np.uint8, 128, np.uint8),
    ("arm", np.int8, 0, np.int8),
])
def test_each_cpu_family_gets_its_layout_of_the_same_values(family, act_dtype, act_zp, w_dtype):
    m, a, w = _lowered(family)
    assert ops(m) == {"QuantizeLinear": 1, "MatMulIntegerToFloat": 1}
    zp = _init(m, f"{a.name}.zero_point")
    assert zp.dtype == act_dtype and int(zp) == act_zp
    mif = _mif(m)
    weight = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == mif.input[1])
    assert weight.dtype == w_dtype
    w_zp = mif.input[5] if len(mif.input) > 5 else ""
    if w_dtype == np.int8:  # symmetric: the codes as they are, no zero point
        assert np.array_equal(weight, w.codes.T) and not w_zp
    else:  # moved up by 128, zero point 128
        assert np.array_equal(weight.astype(np.int16) - 128, w.codes.T)
        assert (_init(m, w_zp) == 128).all()
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta[ortcpu.CPU_METADATA_KEY] == family


def test_default_layout_is_this_machine_s_and_exact_here(x):
    m, a, w = _lowered(None)
    assert {p.key: p.value for p in m.metadata_props}[ortcpu.CPU_METADATA_KEY] == HERE
    assert sqnr_db(reference(x, a, w, _bias(m)), run(m, x)) > 100


def test_the_no_vnni_layout_is_exact_on_every_x86_cpu(x):
    m, a, w = _lowered("x86-avx2")
    assert sqnr_db(reference(x, a, w, _bias(m)), run(m, x)) > 100


@pytest.mark.skipif(HERE != cpu.X86_VNNI, reason="u8 x s8 products are exact only where VNNI adds them in 32 bits")
def test_the_vnni_layout_is_exact_on_a_vnni_cpu(x):
    m, a, w = _lowered("x86-vnni")
    assert sqnr_db(reference(x, a, w, _bias(m)), run(m, x)) > 100


def test_unknown_cpu_family_and_cpu_for_tensorrt_are_refused():
    with pytest.raises(ortcpu.UnknownCpuError, match="x86-vnni, x86-avx2, arm"):
        _lowered("riscv")
    with pytest.raises(ExportError, match="onnxruntime flavour"):
        insert_qdq(linear_graph(), {}, "tensorrt", cpu="arm")


@pytest.mark.parametrize("flags,machine,family", [
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "x86-vnni"),
    ({"avx2", "avx_vnni"}, "x86_64", "x86-vnni"),
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", "x86-avx2"),
    ({"asimd", "asimddp"}, "aarch64", "arm"),
])
def test_cpu_family_detection(flags, machine, family):
    assert cpu.detect(flags, machine) == family


def test_cpuinfo_parsing():
    text = "processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 avx512_vnni\n"
    assert cpu.cpu_model(text) == "Some CPU 9000"
    assert cpu.cpu_flags(text) == {"fpu", "avx2", "avx512_vnni"}


def test_a_vnni_graph_on_a_cpu_without_vnni_is_flagged(tmp_path, monkeypatch, caplog):
    m, _, _ = _lowered("x86-vnni")
    path = tmp_path / "vnni.onnx"
    onnx.save(m, str(path))
    assert exported_metadata(path, ortcpu.CPU_METADATA_KEY) == "x86-vnni"
    monkeypatch.setattr(cpu, "detect", lambda *a, **k: cpu.X86_AVX2)
    assert "--cpu x86-avx2" in layout_mismatch(path)
    with caplog.at_level(logging.WARNING, logger="maskaq_deploy.runtimes.ort_backend"), OrtBackend(path):
        pass
    assert "re-export with --cpu x86-avx2" in caplog.text
    monkeypatch.setattr(cpu, "detect", lambda *a, **k: cpu.X86_VNNI)
    assert layout_mismatch(path) is None


def test_profile_names_the_kernel_path(tmp_path):
    # the same Linear layer on [batch, 1, 5, 32] "images", run the way bench runs a model
    m, _, _ = _lowered(None)
    for v in (m.graph.input[0], m.graph.output[0]):
        dims = v.type.tensor_type.shape.dim
        dims.insert(1, onnx.TensorShapeProto.Dimension(dim_value=1))
        dims[0].dim_param = "batch"
    path = tmp_path / "linear.onnx"
    onnx.save(m, str(path))
    found = profile_ops(path, (1, 5, 32), batch=2, threads=1, runs=3)
    assert {op for op, _ in found} == {"QuantizeLinear", "MatMulIntegerToFloat"}
    assert all(ms >= 0 for _, ms in found)
    line = kernel_summary(found)
    assert "MatMulIntegerToFloat" in line and line.count("%") == 2


def test_an_arm_graph_on_x86_is_flagged(tmp_path, monkeypatch):
    m, _, _ = _lowered("arm")
    path = tmp_path / "arm.onnx"
    onnx.save(m, str(path))
    monkeypatch.setattr(cpu, "detect", lambda *a, **k: cpu.X86_VNNI)
    assert "slow path" in layout_mismatch(path) and "--cpu x86-vnni" in layout_mismatch(path)
