"""Human-readable reports of a run: RUN/report.md (tables) and RUN/report.html (tables and plots).

report.html is self-contained: the plots are PNGs drawn with matplotlib's Agg canvas and inlined as base64 data
URIs, the style sheet is inline, and nothing refers to the network (no external CSS, scripts or fonts), so the
file can be opened from a CI artifact, attached to a ticket, or read on an air-gapped machine.

Both files are built from the same list of sections, so they always agree. Parts whose data is absent (no
sensitivity table, no loss curves, no synthetic images, no latency table) are left out, never faked.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from maskaq_deploy import layout
from maskaq_deploy.records import Manifest, Report
from maskaq_deploy.runtimes.targets import ONNXRUNTIME, TENSORRT, TORCH

log = logging.getLogger(__name__)

MD_FILE, HTML_FILE = layout.MD_FILE, layout.HTML_FILE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUNTIME_NAMES = {TORCH: "torch fake-quant", ONNXRUNTIME: "onnxruntime", TENSORRT: "TensorRT"}
LATENCY_COLUMNS = ("runtime", "artifact", "batch", "threads", "median_ms", "p90_ms", "throughput")
MAX_SENSITIVITY_BARS = 24
MAX_GRIDS = 4


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    align_right: set[int] = field(default_factory=set)  # column indexes holding numbers


@dataclass
class Figure:
    caption: str
    png: bytes
    pixelated: bool = False  # image grids: scale small images up without blurring them


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def write_reports(run_dir, report: Report | dict, manifest: Manifest | dict, *,
                  sensitivity_rows: list[dict] | None = None,
                  latency_rows: list[dict] | None = None) -> tuple[Path, Path]:
    """Write RUN/report.md and RUN/report.html (atomically) of ``report`` and ``manifest`` (records, or the dicts
    of report.json and manifest.json); return their paths."""
    from maskaq_deploy.calib.checkpoint import atomic_write_bytes

    run_dir = Path(run_dir)
    report = report if isinstance(report, Report) else Report.from_dict(report)
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)
    if sensitivity_rows is None:
        sensitivity_rows = (report.sensitivity or {}).get("rows")
    if latency_rows is None:
        latency_rows = report.latency
    sections = build_sections(run_dir, report, manifest, sensitivity_rows, latency_rows)
    title = f"maskaq-deploy report: {report.model} {report.recipe}"
    md_path, html_path = run_dir / MD_FILE, run_dir / HTML_FILE
    atomic_write_bytes(md_path, to_markdown(title, sections).encode())
    atomic_write_bytes(html_path, to_html(title, report, sections).encode())
    return md_path, html_path


# ---------------------------------------------------------------------------------------------- formatting

def _num(x, digits: int = 2, suffix: str = "") -> str:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}{suffix}"


def _pct(x) -> str:
    return "-" if x is None else _num(100.0 * x, 2, "%")


def _runtime_label(name: str) -> str:
    return RUNTIME_NAMES.get(name, name)


# ---------------------------------------------------------------------------------------------- sections

def build_sections(run_dir: Path, report: Report, manifest: Manifest, sensitivity_rows,
                   latency_rows) -> list[Section]:
    sections = [_summary(report, manifest)]
    if report.gate:
        sections.append(_gate(report.gate))
    sections.append(_accuracy(report))
    if sensitivity_rows:
        sections.append(_sensitivity(report, sensitivity_rows))
    calib = _calibration(run_dir, manifest)
    if calib is not None:
        sections.append(calib)
    if latency_rows:
        sections.append(_latency(latency_rows))
    sections.append(_provenance(report, manifest))
    return sections


def _summary(report: Report, manifest: Manifest) -> Section:
    gate = report.gate
    status = "no gate applied" if not gate else ("PASSED" if gate.get("passed") else "BREACHED")
    rows = [
        ["model", f"{report.model} ({report.timm_name})"],
        ["recipe", f"{report.recipe}: {_describe_recipe(manifest.recipe or {})}"],
        ["kept in float", _describe_keep_fp(manifest)],
        ["calibration method", str(report.method)],
        ["validation data", f"{report.val_data} ({report.num_eval_images} images)"],
        ["FP top-1", _num(report.fp_top1, 2, "%")],
        [f"quantized top-1 ({_runtime_label(str(report.runtime))})", _num(report.quant_top1, 2, "%")],
        ["top-1 drop", _num(report.top1_drop, 2, " pts")],
        ["agreement with FP", _pct(report.agreement)],
        ["gate", status],
    ]
    notes = []
    if report.command:
        notes.append(f"Figures from: {report.command}")
    return Section("Summary", notes=notes, tables=[Table(["", ""], rows)])


def _describe_recipe(recipe: dict) -> str:
    if not recipe:
        return "?"
    gran = recipe.get("w_granularity", "channel")
    gran = f"blocks of {recipe.get('w_block_size')}" if gran == "block" else "per channel"
    acts = (f"{recipe['a_bits']}-bit activations ({'symmetric' if recipe.get('a_symmetric', True) else 'asymmetric'}"
            ", per tensor)" if recipe.get("a_bits") else "float activations")
    return f"{recipe.get('w_bits')}-bit weights ({gran}), {acts}"


def _describe_keep_fp(manifest: Manifest) -> str:
    recipe = list((manifest.recipe or {}).get("keep_fp") or [])
    user = list(manifest.keep_fp or [])
    parts = [f"--keep-fp {', '.join(user)}" if user else "no --keep-fp"]
    if recipe:
        parts.append(f"recipe: {', '.join(recipe)}")
    if isinstance(manifest.kept_fp_modules, list):
        parts.append(f"{len(manifest.kept_fp_modules)} quantizable modules float, "
                     f"{manifest.quantized_modules} quantized")
    return "; ".join(parts)


def _gate(gate: dict) -> Section:
    rows = [[c.get("name", ""), _runtime_label(str(c.get("runtime"))), _num(c.get("value"), 4),
             _num(c.get("threshold"), 4), "pass" if c.get("passed") else "BREACH", c.get("message", "")]
            for c in gate.get("checks", [])]
    notes = [(f"Gate {'passed' if gate.get('passed') else 'breached'}: a check passes when the points lost are "
              f"<= the threshold (+{gate.get('tolerance', 1e-9):g} for float noise).")]
    base = gate.get("baseline")
    if base:
        notes.append(f"Baseline: {base.get('path')} ({base.get('model')}, {base.get('recipe')}, method "
                     f"{base.get('method')}, created {base.get('created') or 'unknown'}).")
    table = Table(["check", "runtime", "points lost", "allowed", "result", "detail"], rows, {2, 3})
    return Section("Accuracy gate", notes=notes, tables=[table])


def _accuracy(report: Report) -> Section:
    fp = report.fp_top1
    rows = [["FP (float)", _num(fp, 2, "%"), "-", "-", "-", "-", "-"]]
    runtimes = report.runtimes or {}
    for name, r in runtimes.items():
        drop = fp - r.top1 if isinstance(fp, (int, float)) and isinstance(r.top1, (int, float)) else None
        rows.append([_runtime_label(name), _num(r.top1, 2, "%"), _num(drop, 2), _pct(r.agreement_vs_fp),
                     _pct(r.agreement_vs_torch), _num(r.sqnr_db_vs_torch, 1), _num(r.max_abs_diff_vs_torch, 4)])
    table = Table(["runtime", "top-1", "drop (pts)", "agreement vs FP", "agreement vs torch",
                   "logit SQNR vs torch (dB)", "max |diff| vs torch"], rows, {1, 2, 3, 4, 5, 6})
    figures = []
    png = _plot_accuracy(fp, runtimes)
    if png:
        figures.append(Figure("Top-1 per runtime against the full-precision model", png))
    notes = ["Agreement: share of images where the runtime predicts the same class as the reference."]
    return Section("Accuracy per runtime", notes=notes, tables=[table], figures=figures)


def _sensitivity(report: Report, rows: list[dict]) -> Section:
    meta = report.sensitivity or {}
    table = Table(["rank", "layer", "kind", "bits", "output SQNR (dB)", "weight SQNR (dB)", "input SQNR (dB)"],
                  [[str(r.get("rank", i + 1)), str(r.get("layer")), str(r.get("kind", "")), str(r.get("bits", "")),
                    "exact" if r.get("sqnr_db") is None else _num(r.get("sqnr_db"), 1),
                    _num(r.get("weight_sqnr_db"), 1), _num(r.get("act_sqnr_db"), 1)] for i, r in enumerate(rows)],
                  {0, 4, 5, 6})
    images = f" on {meta['images']} validation images" if meta.get("images") else ""
    notes = [(f"Each quantized layer alone, on the float model's own input{images}: SQNR of its output against "
              "float (higher is better; worst first). Layers at the top are the candidates to keep in float: "
              f"rebuild with --keep-fp '{rows[0].get('layer')}' (one option per layer), or let "
              "'maskaq-deploy sensitivity RUN --max-drop P' search for the shortest list that meets a top-1 "
              "budget.")]
    figures = []
    png = _plot_sensitivity(rows)
    if png:
        figures.append(Figure(f"Worst {min(len(rows), MAX_SENSITIVITY_BARS)} layers by output SQNR", png))
    return Section("Per-layer sensitivity", notes=notes, tables=[table], figures=figures)


def _calibration(run_dir: Path, manifest: Manifest) -> Section | None:
    summary = manifest.calibration
    if not isinstance(summary, dict):
        return None
    rows = []
    for key in ("method", "preset", "images", "num_images", "rounds", "device", "seed"):
        if summary.get(key) is not None:
            rows.append([key, str(summary[key])])
    seconds = summary.get("seconds")
    if isinstance(seconds, dict):
        rows += [[f"seconds: {k}", _num(v, 1)] for k, v in seconds.items() if isinstance(v, (int, float))]
    finals = summary.get("final_losses")
    if isinstance(finals, dict):
        for stage, losses in finals.items():
            if isinstance(losses, dict):
                rows.append([f"final {stage} losses", ", ".join(f"{k} {_num(v, 4)}" for k, v in losses.items()
                                                                if isinstance(v, (int, float)))])
    figures = []
    curves = summary.get("curves")
    if isinstance(curves, dict):
        for stage in ("synthesis", "finetune"):
            series = loss_series(curves.get(stage))
            png = _plot_curves(series, "iteration" if stage == "synthesis" else "epoch") if series else None
            if png:
                figures.append(Figure(f"{'Synthesis' if stage == 'synthesis' else 'Fine-tuning'} losses", png))
    for path in grid_images(run_dir, summary)[-MAX_GRIDS:]:
        figures.append(Figure(f"Calibration images: {path.name}", path.read_bytes(), pixelated=True))
    if not rows and not figures:
        return None
    return Section("Calibration", tables=[Table(["", ""], rows)] if rows else [], figures=figures)


def _latency(rows: list[dict]) -> Section:
    present = [k for k in dict.fromkeys(k for r in rows for k in r)
               if any(r.get(k) not in (None, "") for r in rows)]  # e.g. bench's empty "label"
    keys = [k for k in LATENCY_COLUMNS if k in present] + [k for k in present if k not in LATENCY_COLUMNS]
    digits = {"median_ms": 3, "p90_ms": 3, "throughput": 1}
    table = Table(keys, [[_num(r.get(k), digits.get(k, 0)) if isinstance(r.get(k), float) else
                          ("-" if r.get(k) is None else str(r.get(k))) for k in keys] for r in rows],
                  {i for i, k in enumerate(keys)
                   if all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)})
    note = "median_ms / p90_ms: latency of one batch in milliseconds; throughput: images per second."
    return Section("Latency", notes=[note], tables=[table])


def _provenance(report: Report, manifest: Manifest) -> Section:
    rows = [["created", str(report.created or "-")], ["report schema", str(report.schema_version)]]
    seconds = report.seconds
    if isinstance(seconds, dict):
        rows += [[f"seconds: {k}", _num(v, 1)] for k, v in seconds.items() if isinstance(v, (int, float))]
    versions = manifest.versions
    if isinstance(versions, dict):
        rows += [[k, str(v)] for k, v in versions.items()]
    return Section("Provenance", tables=[Table(["", ""], rows)])


# ---------------------------------------------------------------------------------------------- data helpers

def _numeric_items(d: dict, skip) -> dict:
    return {k: float(v) for k, v in d.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def loss_series(obj, prefix: str = "") -> dict[str, tuple[list[float], list[float]]]:
    """{label: (x, y)} from the shapes a calibration summary may use for a loss curve: a list of numbers;
    a dict of lists of numbers; a list of dicts of numbers (x from 'iteration'/'step'/'epoch', else the
    index); or a list of {'round': r, 'curve': ...} (one set of lines per round). Anything else: nothing."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                out[f"{prefix}{key}"] = (list(range(len(value))), [float(v) for v in value])
            elif isinstance(value, (list, dict)):
                out.update(loss_series(value, f"{prefix}{key} "))
        return out
    if not isinstance(obj, list) or not obj:
        return out
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
        return {f"{prefix}loss".strip(): (list(range(len(obj))), [float(v) for v in obj])}
    if all(isinstance(v, dict) and "curve" in v for v in obj):
        for i, v in enumerate(obj):
            tag = f"{prefix}round {v.get('round', i)} " if len(obj) > 1 else prefix
            out.update(loss_series(v["curve"], tag))
        return out
    if all(isinstance(v, dict) for v in obj):
        xkey = next((k for k in ("iteration", "step", "epoch") if all(k in v for v in obj)), None)
        for i, v in enumerate(obj):
            x = float(v[xkey]) if xkey else float(i)
            for k, y in _numeric_items(v, {"iteration", "step", "epoch", "round"}).items():
                xs, ys = out.setdefault(f"{prefix}{k}", ([], []))
                xs.append(x)
                ys.append(y)
    return out


def grid_images(run_dir: Path, summary: dict) -> list[Path]:
    """PNG files of calibration images the summary names (``image_grid``, ``grid``, ``paths.images``),
    resolved against the run directory; files that are missing or not PNGs are skipped."""
    candidates = []
    for key in ("image_grid", "grid", "grid_png", "images_png"):
        candidates.append(summary.get(key))
    paths = summary.get("paths")
    if isinstance(paths, dict):
        candidates.append(paths.get("images"))
        candidates.append(paths.get("image_grid"))
    flat = []
    for c in candidates:
        flat += c if isinstance(c, list) else [c]
    out = []
    for c in flat:
        if not isinstance(c, str) or not c:
            continue
        p = Path(c) if Path(c).is_absolute() else run_dir / c
        try:
            if p.is_file() and p.read_bytes()[:8] == PNG_SIGNATURE and p not in out:
                out.append(p)
        except OSError:
            continue
    return out


# ---------------------------------------------------------------------------------------------- plots

def _canvas(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _plot_accuracy(fp, runtimes: dict) -> bytes | None:
    names, values = [], []
    if isinstance(fp, (int, float)):
        names.append("FP (float)")
        values.append(float(fp))
    for name, r in runtimes.items():
        if isinstance(r.top1, (int, float)):
            names.append(_runtime_label(name))
            values.append(float(r.top1))
    if not values:
        return None
    fig = _canvas(7, 0.5 + 0.45 * len(values))
    ax = fig.add_subplot()
    colors = ["#7f7f7f"] + ["#1f77b4"] * (len(values) - 1)
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    lo = max(0.0, min(values) - 5.0)
    ax.set_xlim(lo, min(100.0, max(values) + 2.0) if max(values) + 2.0 > lo else lo + 1)
    for bar, v in zip(bars, values[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}%", va="center", fontsize=9)
    ax.set_xlabel("top-1 (%)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _plot_sensitivity(rows: list[dict]) -> bytes | None:
    pts = [(r["layer"], r["sqnr_db"]) for r in rows if isinstance(r.get("sqnr_db"), (int, float))]
    pts = pts[:MAX_SENSITIVITY_BARS]
    if not pts:
        return None
    fig = _canvas(7, 0.6 + 0.22 * len(pts))
    ax = fig.add_subplot()
    labels, values = zip(*pts[::-1])
    ax.barh(labels, values, color="#d62728")
    ax.set_xlabel("output SQNR vs float (dB), lower = more sensitive")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _plot_curves(series: dict, xlabel: str) -> bytes | None:
    series = {k: v for k, v in series.items() if v[0] and all(math.isfinite(y) for y in v[1])}
    if not series:
        return None
    fig = _canvas(7, 3.4)
    ax = fig.add_subplot()
    for label, (xs, ys) in list(series.items())[:12]:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 12 else None, markersize=3)
    ys_all = [y for _, ys in series.values() for y in ys]
    if min(ys_all) > 0 and max(ys_all) / min(ys_all) > 100:  # losses of very different scales
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- writers

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for note in sec.notes:
            out += [note, ""]
        for t in sec.tables:
            header = [c or " " for c in t.columns]
            out.append("| " + " | ".join(_md_cell(c) for c in header) + " |")
            out.append("|" + "|".join("---:" if i in t.align_right else "---" for i in range(len(header))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            out.append("")
        for f in sec.figures:
            out += [f"*{f.caption}: see report.html*", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { color: #444; font-size: 0.9em; margin: 0.4em 0; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figure img.pixelated { image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: #555; }
.badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.3em; font-weight: bold; color: #fff; }
.pass { background: #2e7d32; } .breach { background: #c62828; } .none { background: #757575; }
"""


def to_html(title: str, report: Report, sections: list[Section]) -> str:
    esc = html.escape
    gate = report.gate
    badge = ('<span class="badge none">no gate</span>' if not gate else
             '<span class="badge pass">gate passed</span>' if gate.get("passed") else
             '<span class="badge breach">gate breached</span>')
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{esc(title)}</h1>", f"<p>{badge}</p>"]
    for sec in sections:
        out.append(f"<section><h2>{esc(sec.title)}</h2>")
        for note in sec.notes:
            out.append(f'<p class="note">{esc(note)}</p>')
        for t in sec.tables:
            out.append("<table>")
            if any(t.columns):
                out.append("<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in t.columns) + "</tr></thead>")
            out.append("<tbody>")
            for row in t.rows:
                cells = "".join(f'<td class="num">{esc(str(c))}</td>' if i in t.align_right else
                                f"<td>{esc(str(c))}</td>" for i, c in enumerate(row))
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        for f in sec.figures:
            data = base64.b64encode(f.png).decode("ascii")
            cls = ' class="pixelated"' if f.pixelated else ""
            out.append(f'<figure><img{cls} alt="{esc(f.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(f.caption)}</figcaption></figure>")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
