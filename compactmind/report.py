"""Reports from a study's records (a dict built from the storage alone): report.json, search_history.csv,
search_space_analysis.png and an interactive search_space_analysis.html.

Every file is written to a temporary name and renamed into place, so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path

from compactmind.study.records import StudyRecords, TrialRecord

log = logging.getLogger(__name__)

_FIRST_COLUMNS = ["number", "state", "status", "pipeline", "hybrid", "perplexity", "compression_ratio", "feasible",
                  "bits_per_weight", "sparsity", "model_bytes", "compress_seconds", "eval_seconds", "windows",
                  "eval_tokens", "dtype", "seq_len", "reason"]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


_NOT_IN_CSV = {"window_nll"}  # per-window figures: in report.json, too long for a table cell


def history_csv(records: StudyRecords) -> str:
    trials = [t.to_dict() for t in records.trials]
    columns = list(_FIRST_COLUMNS)
    for t in trials:
        for k in t:
            if k not in columns and k not in _NOT_IN_CSV:
                columns.append(k)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for t in trials:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in t.items()})
    return out.getvalue()


def front_2d(records: StudyRecords) -> list[TrialRecord]:
    """The Pareto front of perplexity vs compression ratio among the feasible evaluated trials (with more than
    two objectives, the study's own front is larger: it is in report.json)."""
    feasible = sorted((t for t in records.trials if t.state == "COMPLETE" and t.feasible is not False),
                      key=lambda t: (-t.compression_ratio, t.perplexity))
    front, best = [], math.inf
    for t in feasible:
        if t.perplexity < best:
            front.append(t)
            best = t.perplexity
    return front[::-1]


def _points(records: StudyRecords):
    done = [t for t in records.trials if t.state == "COMPLETE"]
    singles = [t for t in done if not t.get("hybrid")]
    hybrids = [t for t in done if t.get("hybrid")]
    return singles, hybrids, front_2d(records)


def plot_png(records: StudyRecords) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles, hybrids, front = _points(records)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    ax.scatter([t.compression_ratio for t in singles], [t.perplexity for t in singles], c="tab:blue",
               marker="o", s=36, label="single method")
    ax.scatter([t.compression_ratio for t in hybrids], [t.perplexity for t in hybrids], c="tab:red",
               marker="^", s=44, label="hybrid (two steps)")
    if front:
        ax.plot([t.compression_ratio for t in front], [t.perplexity for t in front], c="black", lw=1.2,
                ls="--", marker="o", mfc="none", ms=10, label="Pareto front")
    dense = records.dense
    if dense:
        ax.scatter([0.0], [dense["perplexity"]], c="green", marker="*", s=180, zorder=5,
                   label=f"dense ({dense['perplexity']:.2f})")
    ax.axvline(records.target_ratio, c="gray", ls=":", label=f"target ratio {records.target_ratio}")
    best = records.best
    if best:
        ax.annotate(f"best: {best.pipeline}", (best.compression_ratio, best.perplexity),
                    xytext=(10, 20), textcoords="offset points", fontsize=8,
                    arrowprops={"arrowstyle": "->", "color": "gray"})
    if singles or hybrids:
        ax.set_yscale("log")
    ax.set_xlabel("compression ratio (1 - bytes / FP32 bytes)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{records.study}: perplexity vs compression ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_html(records: StudyRecords) -> bytes:
    import plotly.graph_objects as go

    singles, hybrids, front = _points(records)

    def trace(points, name, color, symbol):
        text = [f"#{t.number} {t.pipeline}<br>ppl {t.perplexity:.3f} ratio {t.compression_ratio:.4f}"
                f"<br>{t.get('bits_per_weight', 0):.2f} bits/weight, sparsity {t.get('sparsity', 0):.3f}"
                for t in points]
        return go.Scatter(x=[t.compression_ratio for t in points], y=[t.perplexity for t in points],
                          mode="markers", name=name, text=text, hoverinfo="text",
                          marker={"color": color, "symbol": symbol, "size": 9})

    fig = go.Figure([trace(singles, "single method", "royalblue", "circle"),
                     trace(hybrids, "hybrid (two steps)", "crimson", "triangle-up")])
    if front:
        fig.add_trace(go.Scatter(x=[t.compression_ratio for t in front], y=[t.perplexity for t in front],
                                 mode="lines", name="Pareto front", line={"color": "black", "dash": "dash"},
                                 hoverinfo="skip"))
    dense = records.dense
    if dense:
        fig.add_trace(go.Scatter(x=[0.0], y=[dense["perplexity"]], mode="markers", name="dense",
                                 marker={"color": "green", "symbol": "star", "size": 14},
                                 text=[f"dense ppl {dense['perplexity']:.3f}"], hoverinfo="text"))
    fig.add_vline(x=records.target_ratio, line_dash="dot", line_color="gray",
                  annotation_text=f"target {records.target_ratio}")
    fig.update_layout(title=f"{records.study}: perplexity vs compression ratio",
                      xaxis_title="compression ratio", yaxis_title="perplexity", yaxis_type="log",
                      template="plotly_white")
    return fig.to_html(include_plotlyjs=True, full_html=True).encode()


def write(records: StudyRecords, out_dir: str | Path) -> list[Path]:
    """Render every file in memory first, then write each atomically; returns the paths written."""
    out = Path(out_dir)
    rendered = {
        "report.json": json.dumps(_jsonable(records.to_dict()), indent=2, allow_nan=False).encode(),
        "search_history.csv": history_csv(records).encode(),
        "search_space_analysis.png": plot_png(records),
    }
    try:
        rendered["search_space_analysis.html"] = plot_html(records)
    except ImportError:
        log.warning("plotly is not installed; skipping the interactive HTML plot")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in rendered.items():
        _atomic_write(out / name, data)
        paths.append(out / name)
    return paths
