"""benchmarks/real_size.py's predictions and tables from made-up rows (no model is run), and --batch-size as the
synthesis batch."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import real_size  # noqa: E402
import result_tables as T  # noqa: E402


def rows():
    base = {"model": "m", "device": "cpu", "threads": 1, "autocast": "off", "rss_base_mib": 800.0}
    return [{**base, "stage": "synthesis", "batch": 4, "s_per_step": 1.0, "img_steps_per_s": 4.0,
             "peak_rss_mib": 1200.0},
            {**base, "stage": "synthesis", "batch": 8, "s_per_step": 2.0, "img_steps_per_s": 4.0,
             "peak_rss_mib": 1600.0},
            {**base, "stage": "reconstruction", "batch": 32, "s_per_step": 0.5, "units": 12,
             "fwd_p_s_per_img": 0.01, "fwd_q_s_per_img": 0.02, "peak_rss_mib": 1000.0},
            {**base, "stage": "verify", "export_s": 5.0, "ort_s_per_img": 0.01, "torch_s_per_img": 0.02,
             "peak_rss_mib": 900.0}]


def test_prediction_scales_the_step_and_the_memory_to_the_preset():
    p = real_size.predict(rows(), "m", "cpu", 1)
    fast = p["fast (w4a4)"]
    # 256 images / 64 = 4 batches x 100 steps x (2 s at batch 8 -> 16 s at batch 64), one worker
    assert fast["synthesis_s"] == pytest.approx(4 * 100 * 16.0)
    assert fast["synthesis_mib_per_image"] == pytest.approx(100.0)  # (1600 - 1200) / (8 - 4)
    assert fast["synthesis_peak_rss_mib"] == pytest.approx(800 + 100 * 64)
    assert p["fast (w8a8)"]["synthesis_s"] == pytest.approx(fast["synthesis_s"] / 2)  # 50 steps at 8 bits
    assert p["build (default)"]["total_s"] > p["fast (w8a8)"]["total_s"]
    assert "paper (w4a4)" in p


def test_tables_render():
    res = {"rows": rows(), "synth_batch": 8,
           "predictions": [{"model": "m", "device": "cpu", "threads": 1, "presets": real_size.predict(rows(), "m",
                                                                                                      "cpu", 1)}]}
    assert "| `m` | cpu x1 | 2.00 (4.0)" in T.real_size_stage_table(res)
    assert "| `m` | cpu x1 |" in T.real_size_prediction_table(res)
    assert T.duration(30) == "30 s" and T.duration(600) == "10 min" and T.duration(7200) == "2.0 h"


def test_batch_size_option_is_the_synthesis_batch():
    from maskaq_deploy.cli import resolve_configs

    _, cfg = resolve_configs({"batch_size": 16})
    assert cfg.dfq_config().batch_size == 16 and cfg.batch_size == 16
    _, cfg = resolve_configs({})
    assert cfg.dfq_config().batch_size == 64  # the preset's
