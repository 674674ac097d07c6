"""Reports from a study's records (read from the storage alone): report.json, search_history.csv,
search_space_analysis.png, an interactive search_space_analysis.html with the same points, and for a dynamic study
profiles.png (the level of every unit of the trials measured on the test windows).

Every file is written to a temporary name and renamed into place, so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from compactmind import interrupt
from compactmind.files import atomic_write
from compactmind.study.records import StudyRecords, TrialRecord, TrialStatus

log = logging.getLogger(__name__)

_FIRST_COLUMNS = ["number", "state", "status", "pipeline", "hybrid", "perplexity", "compression_ratio", "feasible",
                  "bits_per_weight", "sparsity", "model_bytes", "compress_seconds", "eval_seconds", "windows",
                  "eval_tokens", "dtype", "seq_len", "reason"]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


_NOT_IN_CSV = {"window_nll", "selection_window_nll", "selection_window_kl"}  # per-window: in report.json


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
    """The Pareto front of the quality objective vs compression ratio among the feasible evaluated trials (with
    more than two objectives, the study's own front is larger: it is in report.json)."""
    q = records.quality
    feasible = sorted((t for t in records.trials if t.state == "COMPLETE" and t.feasible is not False
                       and "duplicate_of" not in t.attrs and t.get(q) is not None),
                      key=lambda t: (-t.compression_ratio, t.get(q)))
    front, best = [], math.inf
    for t in feasible:
        if t.get(q) < best:
            front.append(t)
            best = t.get(q)
    return front[::-1]


@dataclass
class Series:
    """One kind of point, drawn the same way in the PNG and the HTML plot."""

    name: str
    points: list[TrialRecord]
    color: str
    marker: str  # matplotlib marker; plotly symbol in SYMBOLS
    hollow: bool = False
    y: str | None = None  # the attribute plotted (default: the quality objective)
    floor: bool = False  # no figure (not evaluated): drawn along the bottom, below every measured point


BASELINE_STYLE = {"uniform": ("tab:orange", "s"), "owl": ("tab:purple", "D"), "shortgpt": ("tab:green", "D"),
                  "random": ("tab:olive", "s"), "llama.cpp Q4_K_M": ("black", "D"), "llama.cpp Q3_K_M": ("black", "s")}
SYMBOLS = {"o": "circle", "^": "triangle-up", "s": "square", "D": "diamond", "x": "x", "v": "triangle-down"}
_LABELS = {"perplexity": "perplexity (test windows)", "selection_perplexity": "perplexity on selection windows",
           "selection_kl": "KL divergence to dense on selection windows"}


def series(records: StudyRecords) -> list[Series]:
    """Every trial that has a figure to draw, by kind; rejected candidates hollow and grey."""
    q = records.quality
    own = [t for t in records.trials if "duplicate_of" not in t.attrs]
    done = [t for t in own if t.state == "COMPLETE" and t.get(q) is not None]
    kept = [t for t in done if t.feasible is not False]
    kinds = list(dict.fromkeys(t.baseline for t in kept if t.baseline))
    searched = [t for t in kept if not t.baseline]
    out = [Series("searched profile" if records.dynamic else "single method",
                  [t for t in searched if not t.get("hybrid")], "tab:blue", "o"),
           Series("hybrid (two steps)", [t for t in searched if t.get("hybrid")], "tab:red", "^"),
           *[Series(f"{kind} profile (baseline)", [t for t in kept if t.baseline == kind],
                    BASELINE_STYLE.get(kind, ("tab:brown", "D"))[0], BASELINE_STYLE.get(kind, ("tab:brown", "D"))[1])
             for kind in kinds],
           Series("over the cap (infeasible)", [t for t in done if t.feasible is False], "gray", "o", hollow=True),
           Series("stopped early (partial figure)", [t for t in own if t.status == "early_stopped"
                                                     and t.get(f"partial_{q}") is not None],
                  "gray", "v", hollow=True, y=f"partial_{q}"),
           Series("below the target ratio (not evaluated; at the bottom)",
                  [t for t in own if t.status == TrialStatus.INFEASIBLE.value], "gray", "x", floor=True)]
    return [s for s in out if s.points]


def drawn(records: StudyRecords) -> list[tuple[Series, list[float], list[float]]]:
    """Each series with its x (ratio) and y values; the not-evaluated ones at a floor a little below the lowest
    measured figure (dense included), so the rejected part of the space shows on a log axis too."""
    q, kinds = records.quality, series(records)
    measured = [(s, [t.compression_ratio for t in s.points], [t.get(s.y or q) for t in s.points])
                for s in kinds if not s.floor]
    values = [y for _, _, ys in measured for y in ys if y is not None and y > 0]
    dense = (records.dense or {}).get(q)
    values += [dense] if dense and dense > 0 else []
    floors = [(s, [t.compression_ratio for t in s.points], [min(values) / 1.3] * len(s.points))
              for s in kinds if s.floor and values]
    return measured + floors


def _title(records: StudyRecords) -> str:
    model = records.model or {}
    name = model.get("name", records.study)
    if model.get("source_format"):
        name += f" (from {model['source_format']}, {model['source_bits_per_weight']:.2f} bits/weight as stored)"
    data = (records.data or {}).get("label", "")
    return f"{name}: {records.quality} vs compression ratio (target >= {records.target_ratio:.4g})\n{data}"[:300]


def plot_png(records: StudyRecords) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.markers import MarkerStyle
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    q = records.quality
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=200)
    plotted = drawn(records)
    for s, xs, ys in plotted:
        face = "none" if s.hollow else s.color
        edge = s.color if MarkerStyle(s.marker).is_filled() else None  # a line marker ("x") takes the face colour
        ax.scatter(xs, ys, marker=s.marker, s=34, facecolors=face, edgecolors=edge,
                   label=f"{s.name} ({len(s.points)})")
    front = front_2d(records)
    if front:
        ax.plot([t.compression_ratio for t in front], [t.get(q) for t in front], c="black", lw=1.0, ls="--",
                label="Pareto front")
    dense = (records.dense or {}).get(q)
    if dense and dense > 0:  # a KL divergence is 0 for the dense model: nothing to draw on a log axis
        ax.scatter([0.0], [dense], c="green", marker="*", s=160, zorder=5, label=f"dense ({dense:.4g})")
    ax.axvline(records.target_ratio, c="gray", ls=":", label=f"target ratio {records.target_ratio:.4g}")
    _spread_ratio_axis(ax, records)
    if records.best and (records.best.get(q) or 0) > 0:  # wrapped, inside the axes, on the side away from it
        lo, hi = ax.get_xlim()
        left = (records.best.compression_ratio - lo) / (hi - lo) > 0.5
        ax.annotate(_best_text(records, width=55), (records.best.compression_ratio, records.best.get(q)),
                    xytext=(0.03 if left else 0.55, 0.2), textcoords="axes fraction", fontsize=7,
                    arrowprops={"arrowstyle": "->", "color": "gray"})
    if plotted and all(y > 0 for _, _, ys in plotted for y in ys if y is not None):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())  # the major ticks (1, 1.5, 2, 3, 5, 7 per decade) say enough
        ax.ticklabel_format(axis="y", style="plain")
    ax.set_xlabel(f"compression ratio (1 - bytes / {(records.protocol or {}).get('baseline_bits', 32)}-bit bytes)")
    ax.set_ylabel(_LABELS.get(q, q) + " (log scale)")
    ax.set_title(_title(records), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _best_text(records: StudyRecords, width: int | None = None) -> str:
    import textwrap

    best = records.best
    text = f"best: trial {best.number}, {best.pipeline}"[:200]
    if width:
        text = textwrap.fill(text, width)
    if records.quality != "perplexity" and best.get("perplexity") is not None:
        text += f"\ntest perplexity {best.get('perplexity'):.4g}"
    return text


def _spread_ratio_axis(ax, records: StudyRecords) -> None:
    """A dynamic study's profiles all sit at the target ratio, a few bytes apart: give the axis a readable span
    and a few plain ticks instead of a sliver with overlapping labels."""
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    lo, hi = ax.get_xlim()
    if hi - lo < 0.02:
        middle = records.target_ratio
        ax.set_xlim(middle - 0.02, middle + 0.02)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.3f" if hi - lo < 0.1 else "%.2f"))


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_html(records: StudyRecords) -> bytes:
    import plotly.graph_objects as go

    q = records.quality

    def hover(t: TrialRecord, y: str) -> str:
        return (f"#{t.number} {t.pipeline}<br>{y} {t.get(y):.4g}, ratio {t.compression_ratio:.4f}<br>"
                f"{t.get('bits_per_weight', 0):.2f} bits/weight, sparsity {t.get('sparsity', 0):.3f}; {t.status}")

    fig = go.Figure()
    for s, xs, ys in drawn(records):
        symbol = SYMBOLS[s.marker] + ("-open" if s.hollow and s.marker != "x" else "")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=f"{s.name} ({len(s.points)})", hoverinfo="text",
                                 text=[f"#{t.number} {t.pipeline}<br>ratio {t.compression_ratio:.4f}: below the "
                                       "target, not evaluated" if s.floor else hover(t, s.y or q) for t in s.points],
                                 marker={"color": s.color.replace("tab:", ""), "symbol": symbol, "size": 9}))
    front = front_2d(records)
    if front:
        fig.add_trace(go.Scatter(x=[t.compression_ratio for t in front], y=[t.get(q) for t in front], mode="lines",
                                 name="Pareto front", line={"color": "black", "dash": "dash"}, hoverinfo="skip"))
    dense = (records.dense or {}).get(q)
    if dense and dense > 0:
        fig.add_trace(go.Scatter(x=[0.0], y=[dense], mode="markers", name=f"dense ({dense:.4g})", hoverinfo="text",
                                 marker={"color": "green", "symbol": "star", "size": 14}, text=[f"dense {dense:.4g}"]))
    fig.add_vline(x=records.target_ratio, line_dash="dot", line_color="gray",
                  annotation_text=f"target ratio {records.target_ratio:.4g}")
    if records.best and (records.best.get(q) or 0) > 0:
        fig.add_annotation(x=records.best.compression_ratio, y=math.log10(records.best.get(q)),
                           text=_best_text(records).replace("\n", "<br>"), showarrow=True, font={"size": 10})
    fig.update_layout(title=_title(records).replace("\n", "<br>"), xaxis_title="compression ratio",
                      yaxis_title=_LABELS.get(q, q), yaxis_type="log", template="plotly_white")
    fig.update_yaxes(tickformat="~r")
    return fig.to_html(include_plotlyjs=True, full_html=True).encode()


def plot_profiles(records: StudyRecords) -> bytes | None:
    """A dynamic study: the option of every unit (a level, drop, an embedding's own), one row per trial measured on
    the test windows; the colour bar names the block units' options."""
    if not records.dynamic:
        return None
    rows = [t for t in records.trials if t.get("profile") and t.get("perplexity") is not None
            and "duplicate_of" not in t.attrs]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = records.dynamic.get("options") or [records.dynamic["levels"]]
    blocks = next((o for o in options if not any(": " in label for label in o)), options[0])  # levels (and drop)
    top = max(len(o) for o in options) - 1
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.25 * len(rows[0].get("profile"))), 1.2 + 0.45 * len(rows)),
                           dpi=200)
    image = ax.imshow([t.get("profile") for t in rows], aspect="auto", cmap="viridis", vmin=0, vmax=max(1, top))
    ax.set_yticks(range(len(rows)), [f"#{t.number} {t.baseline or ''} ppl {t.get('perplexity'):.4g}"
                                     for t in rows], fontsize=7)
    ax.set_xlabel("unit (block order)")
    own = " (an embedding unit: its own option, least compressed first)" if any(
        ": " in label for o in options for label in o) else ""
    ax.set_title(f"{records.study}: option per unit (0 = least compressed){own}; test perplexity", fontsize=9)
    bar = fig.colorbar(image, ax=ax, ticks=range(len(blocks)))
    bar.ax.set_yticklabels([text[:40] for text in blocks], fontsize=6)
    return _png(fig)


def _html(records: StudyRecords) -> bytes | None:
    try:
        return plot_html(records)
    except ImportError:
        log.warning("plotly is not installed; skipping the interactive HTML plot")
        return None


RENDERERS = {  # file name -> its bytes (None: not made for this study)
    "report.json": lambda r: json.dumps(_jsonable(r.to_dict()), indent=2, allow_nan=False).encode(),
    "search_history.csv": lambda r: history_csv(r).encode(),
    "search_space_analysis.png": lambda r: plot_png(r),
    "profiles.png": lambda r: plot_profiles(r),
    "search_space_analysis.html": _html,
}


def write(records: StudyRecords, out_dir: str | Path) -> list[Path]:
    """Render every file in memory first (a signal takes effect between two of them), then write each
    atomically, with no stop between the writes, so the files always describe one state of the study; returns
    the paths written."""
    out = Path(out_dir)
    rendered = {}
    for name, render in RENDERERS.items():
        interrupt.checkpoint()
        data = render(records)
        if data is not None:
            rendered[name] = data
    out.mkdir(parents=True, exist_ok=True)
    for name, data in rendered.items():
        atomic_write(out / name, data)
    return [out / name for name in rendered]
