"""The benchmarks' results files (benchmarks/results/*.json) and the markdown tables made from them.

Every results file is one JSON object with ``benchmark`` (its name), ``source`` (``commands``: the commands that
measured it; ``transcribed_from``: where figures that were copied from an earlier document came from, absent once
a rerun has replaced them all), ``machine`` (where it ran, in words) and ``meta`` (the settings), then the figures:
``rows`` for most benchmarks; ``runs`` (one entry per model / recipe / method / seed) and ``cells`` (their mean and
standard deviation over seeds) for ``dfq_accuracy``. The benchmarks write these files and
``scripts/render_docs.py`` turns them into docs/results.md; neither imports torch here, so rendering is cheap.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECIPES = ("w8a8", "w4a8", "w4a4", "w3a3")
DFQ_METHODS = ("noise", "psaq", "maskaq-calib", "maskaq-fast", "real", "real-recon")
MODELS = ("embedded", "deit_s2", "swin", "vit_gap")


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON through a temporary file in the same folder, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_commands(res: dict, measured: list[dict], command: str, replaced_all: bool) -> None:
    """Say in ``source`` which commands measured the figures: once no transcribed figure is left, exactly the
    commands of the ``measured`` entries (``transcribed_from`` goes); until then ``command`` is added."""
    source = res.setdefault("source", {})
    if replaced_all:
        source.pop("transcribed_from", None)
        source.pop("note", None)
        source["commands"] = list(dict.fromkeys(m["command"] for m in measured if "command" in m))
    elif command not in source.setdefault("commands", []):
        source["commands"].append(command)


def merge_rows(res: dict, rows: list[dict], key: tuple[str, ...], command: str) -> bool:
    """Replace the rows of ``res`` that have the same ``key`` fields as a new row, keep the others; True when
    every row kept was measured by a command of this tool (none transcribed is left)."""
    new_keys = {tuple(r.get(k) for k in key) for r in rows}
    kept = [r for r in res.get("rows", []) if tuple(r.get(k) for k in key) not in new_keys]
    for r in rows:
        r["command"] = command
    res["rows"] = kept + rows
    replaced_all = all("command" in r for r in kept)
    record_commands(res, res["rows"], command, replaced_all)
    return replaced_all


# --- dfq_accuracy: cells from runs


def dfq_cells(runs: dict) -> tuple[dict, dict]:
    """Mean and standard deviation over seeds of each (model, recipe, method) of ``runs``, and the mean CPU
    seconds of each (model, method) over recipes. Wall time counts only runs that did all their work (a resumed
    run's clock started at the resume)."""
    groups: dict[str, list[dict]] = {}
    for r in runs.values():
        groups.setdefault(f"{r['model']}/{r['recipe']}/{r['method']}", []).append(r)
    cells = {}
    for key, rows in groups.items():
        accs = [r["top1"] for r in rows]
        timed = [r for r in rows if not r.get("resumed")]
        cell = {"model": rows[0]["model"], "recipe": rows[0]["recipe"], "method": rows[0]["method"],
                "n": len(rows), "top1_mean": round(statistics.mean(accs), 4),
                "top1_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                "seconds": round(statistics.mean(r["seconds"] for r in timed), 1) if timed else None,
                "from": "runs"}
        cpu = [r["cpu_seconds"] for r in timed if "cpu_seconds" in r]
        if cpu:
            cell["cpu_seconds"] = round(statistics.mean(cpu), 1)
        cells[key] = cell
    cpu_groups: dict[str, list[float]] = {}
    for r in runs.values():
        if "cpu_seconds" in r and not r.get("resumed"):
            cpu_groups.setdefault(f"{r['model']}/{r['method']}", []).append(r["cpu_seconds"])
    cpu_means = {k: {"model": k.split("/")[0], "method": k.split("/")[1], "cpu_seconds": round(statistics.mean(v), 1),
                     "from": "runs"} for k, v in cpu_groups.items()}
    return cells, cpu_means


def refresh_dfq(res: dict, command: str) -> None:
    """Recompute ``cells`` and ``cpu_seconds`` from ``runs`` (each run records the ``command`` that made it): a
    cell measured by runs replaces a transcribed one of the same model / recipe / method, the others stay."""
    cells, cpu = dfq_cells(res.get("runs", {}))
    res["cells"] = {**res.get("cells", {}), **cells}
    res["cpu_seconds"] = {**res.get("cpu_seconds", {}), **cpu}
    left = [c for c in (*res["cells"].values(), *res["cpu_seconds"].values()) if c.get("from") == "transcribed"]
    record_commands(res, list(res.get("runs", {}).values()), command, replaced_all=not left)


# --- markdown


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def provenance(res: dict) -> str:
    """Where and how the figures of one results file were measured: the machine once, the commands once."""
    source = res.get("source", {})
    lines = [f"Machine: {res.get('machine', 'not recorded')}."]
    if source.get("transcribed_from"):
        lines.append(f"Transcribed from {source['transcribed_from']}"
                     + (f" ({source['note']})" if source.get("note") else "") + ".")
    elif source.get("note"):
        lines.append(source["note"][0].upper() + source["note"][1:] + ".")
    text = " ".join(lines) + " Measured by:\n\n"
    text += "".join(f"    {c}\n" for c in source.get("commands", []))
    return text + "\n"


def dfq_cell(cell: dict | None, bold: bool) -> str:
    if cell is None:
        return "not measured"
    acc = f"{cell['top1_mean']:.2f}"
    seconds = "resumed" if cell.get("seconds") is None else f"{cell['seconds']:.0f} s"
    n = f", n={cell['n']}" if cell["n"] < 3 else ""
    return f"{'**' + acc + '**' if bold else acc} ± {cell['top1_std']:.2f} ({seconds}{n})"


def dfq_models(res: dict) -> list[str]:
    present = {c["model"] for c in res.get("cells", {}).values()}
    return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def dfq_recipe_table(res: dict, recipe: str, methods=DFQ_METHODS) -> str:
    cells = res.get("cells", {})
    fp = res.get("meta", {}).get("fp_top1", {})
    rows = []
    for model in dfq_models(res):
        got = {m: cells.get(f"{model}/{recipe}/{m}") for m in methods}
        best = max((c["top1_mean"] for c in got.values() if c), default=None)
        fp_s = f"{fp[model]:.2f}" if model in fp else "-"
        rows.append([model, fp_s] + [dfq_cell(c, c is not None and c["top1_mean"] == best) for c in got.values()])
    return md_table(["model", "FP", *methods], rows)


def dfq_by_recipe_table(res: dict) -> str:
    """One model's cells, a row per recipe: top-1 (calibration wall time) of each method measured."""
    cells = res.get("cells", {})
    fp = res.get("meta", {}).get("fp_top1", {})
    methods = [m for m in DFQ_METHODS if any(c["method"] == m for c in cells.values())]
    rows = []
    for model in dfq_models(res):
        for recipe in RECIPES:
            got = [cells.get(f"{model}/{recipe}/{m}") for m in methods]
            if any(got):
                rows.append([model, recipe, f"{fp[model]:.2f}" if model in fp else "-"]
                            + [dfq_cell(c, False) for c in got])
    return md_table(["model", "recipe", "FP", *methods], rows)


def dfq_cpu_table(res: dict, methods=DFQ_METHODS) -> str:
    cpu = res.get("cpu_seconds", {})
    rows = [[model] + [f"{cpu[f'{model}/{m}']['cpu_seconds']:.0f}" if f"{model}/{m}" in cpu else "-"
                       for m in methods] for model in dfq_models(res)]
    return md_table(["model", *methods], rows)


def dfq_w8a8_cpu_table(res: dict, methods=("maskaq-calib", "maskaq-fast")) -> str:
    cells = res.get("cells", {})
    rows = []
    for model in dfq_models(res):
        got = [cells.get(f"{model}/w8a8/{m}", {}).get("cpu_seconds") for m in methods]
        rows.append([model] + ["-" if v is None else f"{v:.0f}" for v in got])
    return md_table(["model", *methods], rows)


# what each recipe asks of the data-free method, tested on (data-free, real, psaq, FP) means
COMPARISONS = {
    "w8a8": ("drop <= 0.10 (torch)", lambda d, r, p, fp: fp is not None and fp - d <= 0.10 + 1e-9),
    "w4a8": ("within 0.10 of real", lambda d, r, p, fp: r is not None and d >= r - 0.10 - 1e-9),
    "w4a4": (">= real", lambda d, r, p, fp: r is not None and d >= r),
    "w3a3": (">= real and >= psaq + 2", lambda d, r, p, fp: r is not None and p is not None and d >= r and d >= p + 2),
}


def dfq_comparison_table(res: dict) -> str:
    cells = res.get("cells", {})
    fp = res.get("meta", {}).get("fp_top1", {})
    rows = []
    for model in dfq_models(res):
        for recipe, (what, ok) in COMPARISONS.items():
            d, r, p = (cells.get(f"{model}/{recipe}/{m}") for m in ("maskaq-fast", "real", "psaq"))
            dm, rm, pm = (c["top1_mean"] if c else None for c in (d, r, p))
            if dm is None:
                verdict = "not measured"
            elif recipe != "w8a8" and (rm is None or (recipe == "w3a3" and pm is None)):
                verdict = "not measured (reference missing)"
            else:
                verdict = "met" if ok(dm, rm, pm, fp.get(model)) else "missed"
                if recipe == "w8a8" and model in fp:
                    verdict += f", drop {fp[model] - dm:.2f}"
                if d["n"] < 3:
                    verdict += f" (n={d['n']})"
            rows.append([model, recipe, what] + ["-" if v is None else f"{v:.2f}" for v in (dm, rm, pm)] + [verdict])
    return md_table(["model", "recipe", "asked of the data-free method", "data-free", "real", "psaq", "verdict"],
                    rows)


def synthesis_speed_table(res: dict) -> str:
    ref = res.get("meta", {}).get("reference_s_per_step", {})
    main = [r for r in res.get("rows", []) if not r["step"].startswith(" ")]
    keys = []
    for r in main:
        if (r["step"], r["threads"]) not in keys:
            keys.append((r["step"], r["threads"]))
    rows = []
    for step, threads in sorted(keys, key=lambda k: (-k[1], k[0] != "synthesis")):
        cells = []
        for mode in ("off", "bf16"):
            r = next((r for r in main if (r["step"], r["threads"], r["autocast"]) == (step, threads, mode)), None)
            ratio = f" ({r['vs_reference']:.2f}x)" if r and r.get("vs_reference") else ""
            cells.append("-" if r is None else f"{r['s_per_step']:.3f}{ratio}")
        reference = ref.get(str(threads), {}).get(step)
        rows.append([step, str(threads), "-" if reference is None else f"{reference:.2f}", *cells])
    return md_table(["step", "threads", "reference", "ours, float32", "ours, bf16"], rows)


def synthesis_breakdown_table(res: dict) -> str:
    parts = [r for r in res.get("rows", []) if r["step"].startswith(" ")]
    return md_table(["part of a synthesis step", "threads", "autocast", "seconds"],
                    [[r["step"].strip(), str(r["threads"]), r["autocast"], f"{r['s_per_step']:g}"] for r in parts])


def modelopt_table(res: dict) -> str:
    rows = []
    for r in res.get("rows", []):
        rules = f" ({', '.join(r['rules'])})" if r.get("rules") else ""
        rows.append([r["graph"], f"{r['onnxruntime_top1']:.2f}", f"{r['agreement']:.2f}%",
                     "-" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f} dB", f"{r['findings']}{rules}",
                     f"{r['q']} / {r['dq']}", f"{r['mb']:.2f} MB"])
    return md_table(["graph", "onnxruntime top-1", "agreement vs FP", "logit SQNR vs FP", "TensorRT-rule findings",
                     "Q / DQ nodes", "file size"], rows)


def tensorrt_flavour_table(res: dict) -> str:
    return md_table(["recipe", "graph", "onnxruntime top-1", "agreement with torch", "logits SQNR vs torch"],
                    [[r["recipe"], r["graph"], f"{r['onnxruntime_top1']:.2f}", f"{r['agreement']:.2f}%",
                      f"{r['sqnr_db']:.1f} dB"] for r in res.get("rows", [])])


def real_calibration_table(res: dict) -> str:
    rows = []
    for r in res.get("rows", []):
        ort = [f"{r['onnxruntime_top1']:.2f}", f"{r['agreement']:.2f}%", f"{r['sqnr_db']:.1f} dB"] \
            if "onnxruntime_top1" in r else ["-", "-", "-"]
        rows.append([r["recipe"], f"{r['torch_top1']:.2f}", f"{r['drop']:.2f}", *ort])
    return md_table(["recipe", "torch fake-quant top-1", "drop (points)", "onnxruntime top-1", "agreement with torch",
                     "logits SQNR vs torch"], rows)


def zoo_table(res: dict) -> str:
    return md_table(["model", "layout", "FP top-1", "onnxruntime w8a8 top-1", "agreement onnxruntime vs torch",
                     "TensorRT-rule violations"],
                    [[f"`{r['model']}`", r["layout"], f"{r['fp_top1']:.2f}", f"{r['onnxruntime_top1']:.2f}",
                      f"{r['agreement']:.2f}%", str(r["trt_rule_violations"])] for r in res.get("rows", [])])


def default_build_table(res: dict) -> str:
    return md_table(["build", "build_total (s)", "synthesis (s)", "reconstruction (s)"],
                    [[str(i + 1), f"{r['build_total']:.1f}", f"{r['synthesis']:.1f}", f"{r['reconstruction']:.1f}"]
                     for i, r in enumerate(res.get("rows", []))])


def duration(seconds: float) -> str:
    """A predicted wall time in the unit a reader plans with: s, min, h or days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def _real_size_row(rows: list[dict], **key) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def real_size_stage_table(res: dict) -> str:
    """Measured cost of each stage per model and device (benchmarks/real_size.py)."""
    rows, out = res.get("rows", []), []
    batch = res.get("synth_batch", 8)
    keys = list(dict.fromkeys((r["model"], r["device"], r["threads"]) for r in rows))
    for model, device, threads in keys:
        k = {"model": model, "device": device, "threads": threads}
        syn = _real_size_row(rows, stage="synthesis", autocast="off", batch=batch, **k)
        bf = _real_size_row(rows, stage="synthesis", autocast="bf16", batch=batch, **k)
        rec = _real_size_row(rows, stage="reconstruction", **k)
        ver = _real_size_row(rows, stage="verify", **k)
        ft = _real_size_row(rows, stage="finetune", **k)
        peak_key = "peak_cuda_mib" if device == "cuda" else "peak_rss_mib"

        def f(r, key, fmt="{:.2f}"):
            return "-" if r is None or r.get(key) is None else fmt.format(r[key])

        out.append([f"`{model}`", f"{device} x{threads}" if device == "cpu" else device,
                    f"{f(syn, 's_per_step')} ({f(syn, 'img_steps_per_s', '{:.1f}')})",
                    f"{f(bf, 's_per_step')} ({f(bf, 'img_steps_per_s', '{:.1f}')})",
                    f(rec, "s_per_step"), f(ft, "s_per_step"), f(ver, "export_s", "{:.1f}"),
                    f(ver, "ort_s_per_img", "{:.3f}"), f(ver, "torch_s_per_img", "{:.3f}"),
                    _gib(syn and syn.get(peak_key)), _gib(bf and bf.get(peak_key)), _gib(rec and rec.get(peak_key)),
                    _gib(ver and ver.get(peak_key))])
    mem = "peak GPU GiB" if any(r["device"] == "cuda" for r in rows) else "peak RSS GiB"
    return md_table(["model", "device", f"synthesis s/step fp32, batch {batch} (img-steps/s)",
                     f"synthesis s/step bf16, batch {batch} (img-steps/s)", "reconstruction s/step (batch 32)",
                     "fine-tune s/step (batch 16)", "export s", "onnxruntime s/img", "torch fake-quant s/img",
                     f"{mem}: synthesis fp32", "synthesis bf16", "reconstruction", "export + verify"], out)


def real_size_prediction_table(res: dict) -> str:
    """Predicted wall time of each preset and of the default build (benchmarks/real_size.py)."""
    out = []
    for p in res.get("predictions", []):
        pr = p.get("presets") or {}
        if not pr:
            continue
        dev = f"{p['device']} x{p['threads']}" if p["device"] == "cpu" else p["device"]
        cells = [duration(pr[n]["total_s"]) if n in pr else "-"
                 for n in ("fast (w4a4)", "fast (w8a8)", "paper (w4a4)", "build (default)")]
        f4 = pr.get("fast (w4a4)", {})
        split = (f"{duration(f4['synthesis_s'])} + {duration(f4['reconstruction_s'])}" if f4 else "-")
        out.append([f"`{p['model']}`", dev, *cells, split, _gib(f4.get("synthesis_peak_rss_mib"))])
    return md_table(["model", "device", "`fast` w4a4", "`fast` w8a8", "`paper` w4a4", "default `build` (w8a8)",
                     "`fast` w4a4: synthesis + reconstruction", "`fast` synthesis peak RSS GiB (batch 64)"], out)
