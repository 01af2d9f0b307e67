#!/usr/bin/env bash
# GPU check for a CUDA machine with torch + onnxruntime (TensorRT not needed):
#   1. MaskAQ synthesis and fine-tune steps on deit_small_patch16_224 (random weights), batch 32, with and
#      without autocast (benchmarks/synthesis_speed.py prints its own table);
#   2. a w8a8 QDQ export of the same model, run by onnxruntime's CUDA provider when present (latency, and
#      top-1 agreement with the CPU provider).
# Every step is guarded: a missing piece prints "skipped: reason" and the script goes on. Each step runs under
# `timeout`, so the whole check ends in under 8 minutes. Wall-clock numbers are printed, never asserted.
#
#   bash benchmarks/gpu_check.sh        (from the repository root, with the venv active)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -uo pipefail

PY="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROWS=()
row() { ROWS+=("$(printf '%-28s %-8s %s' "$1" "$2" "$3")"); }
skip() { echo "skipped: $2"; row "$1" skipped "$2"; }

echo "== environment"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "skipped: no python ('$PY'); activate the venv or set PYTHON" >&2
  exit 1
fi
env_line="$(timeout 60 "$PY" - <<'PY' 2>&1
import torch
try:
    import onnxruntime as ort
    o = f"onnxruntime {ort.__version__} {ort.get_available_providers()}"
except ImportError:
    o = "onnxruntime missing"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); {o}")
PY
)"
echo "$env_line"
row "environment" "info" "$(echo "$env_line" | tail -n 1)"
has_cuda=0
timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && has_cuda=1

echo "== MaskAQ synthesis + fine-tune speed (deit_small_patch16_224, batch 32, autocast off/on)"
if [ "$has_cuda" -ne 1 ]; then
  skip "synthesis + fine-tune" "no CUDA GPU visible to torch"
elif [ ! -f benchmarks/synthesis_speed.py ]; then
  skip "synthesis + fine-tune" "benchmarks/synthesis_speed.py not found (run from the repository root)"
else
  start=$SECONDS
  timeout 270 "$PY" benchmarks/synthesis_speed.py --model deit_small_patch16_224 --batch 32 --device cuda \
    --autocast both --steps 10 2>&1 | tee "$WORK/synthesis.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    row "synthesis + fine-tune" "ok" "table above ($((SECONDS - start)) s)"
  elif [ "$rc" -eq 124 ]; then
    row "synthesis + fine-tune" "timeout" "stopped after 270 s"
  else
    row "synthesis + fine-tune" "failed" "exit $rc: $(tail -n 1 "$WORK/synthesis.log")"
  fi
fi

echo "== w8a8 QDQ export + onnxruntime CUDA provider"
# The snippet prints "ROW<TAB>step<TAB>status<TAB>detail" lines for the summary; everything else is its log.
timeout 170 "$PY" - "$WORK" <<'PY' 2>&1 | tee "$WORK/qdq.log"
import sys
import time
from pathlib import Path

work = Path(sys.argv[1])


def row(step, status, detail):
    if status == "skipped":
        print(f"skipped: {detail}")
    print(f"ROW\t{step}\t{status}\t{detail}", flush=True)


try:
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch
except ImportError as e:
    row("qdq export", "skipped", f"missing {e.name}")
    sys.exit(0)

torch.manual_seed(0)
model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
rng = np.random.default_rng(0)
calib = [rng.standard_normal((8, 3, 224, 224)).astype(np.float32) for _ in range(2)]
qdq = work / "deit_small.qdq.onnx"
how = None
try:  # the project's exporter; its absence or a changed API falls back to onnxruntime's quantizer below
    from maskaq_deploy.calib import RECIPES, attach_quantizers, calibrate_observers
    from maskaq_deploy.export.qdq import export_qdq_onnx

    attach_quantizers(model, RECIPES["w8a8"])
    calibrate_observers(model, lambda m: [m(torch.from_numpy(b)) for b in calib])
    export_qdq_onnx(model, qdq, flavour="onnxruntime", batch_size=8, dynamic_batch=True)
    how = "project exporter (export.qdq.export_qdq_onnx, w8a8, random calibration)"
except Exception as e:  # noqa: BLE001 - any failure of the optional path means: use the fallback
    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    print(f"project exporter unavailable ({reason}); falling back to onnxruntime.quantization")
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        fp = work / "deit_small.fp32.onnx"
        torch.onnx.export(model, (torch.from_numpy(calib[0]),), str(fp), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}},
                          opset_version=17, dynamo=False)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib)

            def get_next(self):
                b = next(self.it, None)
                return None if b is None else {"images": b}

        quantize_static(str(fp), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        how = f"fallback onnxruntime.quantization (project exporter: {reason})"
    except Exception as e2:  # noqa: BLE001
        row("qdq export", "skipped", f"no QDQ model: {type(e2).__name__}: {e2}")
        sys.exit(0)
row("qdq export", "ok", f"{qdq.stat().st_size / 2**20:.1f} MiB via {how}")

x = rng.standard_normal((32, 3, 224, 224)).astype(np.float32)


def bench(providers, n=10):
    sess = ort.InferenceSession(str(qdq), providers=providers)
    name = sess.get_inputs()[0].name
    y = sess.run(None, {name: x})[0]  # warm-up (and kernel selection)
    t = time.perf_counter()
    for _ in range(n):
        sess.run(None, {name: x})
    return y, (time.perf_counter() - t) / n * 1000, sess.get_providers()[0]


y_cpu, ms_cpu, _ = bench(["CPUExecutionProvider"], n=2)
row("onnxruntime CPU", "ok", f"{ms_cpu:.1f} ms / batch 32 ({32000 / ms_cpu:.0f} img/s)")
available = ort.get_available_providers()
if "CUDAExecutionProvider" not in available:
    row("onnxruntime CUDA", "skipped",
        f"onnxruntime has no CUDAExecutionProvider (available: {available}); pip install onnxruntime-gpu")
else:
    try:
        y_gpu, ms_gpu, used = bench(["CUDAExecutionProvider", "CPUExecutionProvider"])
        agree = float(np.mean(y_gpu.argmax(1) == y_cpu.argmax(1)))
        row("onnxruntime CUDA", "ok" if used == "CUDAExecutionProvider" else "fallback",
            f"{ms_gpu:.1f} ms / batch 32 ({32000 / ms_gpu:.0f} img/s) on {used}; top-1 vs CPU {agree:.3f}, "
            f"max |diff| {np.abs(y_gpu - y_cpu).max():.3g}")
    except Exception as e:  # noqa: BLE001
        row("onnxruntime CUDA", "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
PY
rc=${PIPESTATUS[0]}
while IFS=$'\t' read -r tag step status detail; do
  [ "$tag" = ROW ] && row "$step" "$status" "$detail"
done < "$WORK/qdq.log"
if [ "$rc" -eq 124 ]; then
  row "qdq export + onnxruntime" "timeout" "stopped after 170 s"
elif [ "$rc" -ne 0 ]; then
  row "qdq export + onnxruntime" "failed" "exit $rc: $(grep -v '^ROW' "$WORK/qdq.log" | tail -n 1)"
fi

echo
echo "== gpu_check summary"
printf '%-28s %-8s %s\n' "step" "status" "detail"
for r in "${ROWS[@]}"; do
  echo "$r"
done
