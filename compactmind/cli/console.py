"""What the command line prints: progress bars (on a terminal) or plain log lines (elsewhere), and the tables
of `run`, `best` and `methods`. Only the CLI uses this module."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from compactmind import progress
from compactmind.objectives import QUALITY_OBJECTIVES

if TYPE_CHECKING:
    from compactmind.study.records import StudyRecords, TrialRecord

log = logging.getLogger("compactmind")
_SHORT = {"perplexity": "ppl", "selection_perplexity": "selection ppl", "selection_kl": "selection KL"}


class Progress(progress.Progress):
    """On a terminal: a bar over trials and, below it, one over the running step (a method's blocks, an
    evaluation's windows), each finished trial printed above them. Elsewhere (a log file, CI): log lines, one
    per trial and one every 10 s of a long step (COMPACTMIND_LOG_EVERY_S), so no minute passes silently."""

    def __init__(self):
        self.log_every_s = float(os.environ.get("COMPACTMIND_LOG_EVERY_S", "10"))
        self.on = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
        self.total = None
        self.trials = self.step = None
        self._step_key, self._logged, self._last_log = None, False, time.monotonic()

    def start(self, total: int | None, done: int = 0) -> None:
        """The trials begin: `total` of them (None: to a budget), `done` already."""
        self.total = total
        if self.on:
            from tqdm import tqdm

            self.trials = tqdm(total=total, initial=min(done, total or done), unit="trial", desc="trials",
                               position=0, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def line(self, text: str) -> None:
        if self.on:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            log.info(text)

    def level_built(self, done: int, total: int, label: str, how: str) -> None:
        self._end_step()
        self.line(f"level {done}/{total} {label}: {how}")

    def block(self, step: str, done: int, total: int) -> None:
        self._step(f"compressing {step}", "block", done, total)

    def window(self, done: int, total: int) -> None:
        self._step("evaluating", "window", done, total)

    def _step(self, desc: str, unit: str, done: int, total: int) -> None:
        if not self.on:  # a line when the step has run log_every_s since the last one, and its end after that
            now = time.monotonic()
            if self._step_key != desc:
                self._step_key, self._logged, self._last_log = desc, False, now
            if now - self._last_log >= self.log_every_s or (done >= total and self._logged):
                log.info("%s: %s %d/%d", desc, unit, done, total)
                self._last_log, self._logged = now, True
            if done >= total:
                self._step_key = None
            return
        if self.step is None or self._step_key != desc:
            self._end_step()
            from tqdm import tqdm

            self.step = tqdm(total=total, unit=unit, desc=desc[:60], position=1, leave=False, dynamic_ncols=True)
            self._step_key = desc
        self.step.update(done - self.step.n)
        if done >= total:
            self._end_step()

    def _end_step(self) -> None:
        if self.step is not None:
            self.step.close()
        self.step, self._step_key = None, None

    def trial_done(self, rec: dict) -> None:
        self._end_step()
        found = [(n, rec[key]) for n in QUALITY_OBJECTIVES for key in (n, f"partial_{n}") if key in rec]
        name, value = found[0] if found else ("perplexity", None)
        figures = f"{_SHORT[name]} {value:.4g}" if isinstance(value, float) else "ppl -"
        ratio = rec.get("compression_ratio")
        figures += f", ratio {ratio:.4f}" if isinstance(ratio, float) else ""
        took = sum(rec.get(k) or 0.0 for k in ("compress_seconds", "eval_seconds", "selection_eval_seconds"))
        status = f"duplicate of trial {rec['duplicate_of']}" if "duplicate_of" in rec else rec.get("status")
        count = f" ({self.trials.n + 1}/{self.total})" if self.on and self.total else ""
        self.line(f"[trial {rec['number']}]{count} {rec.get('pipeline')}: {figures} ({status}, {took:.1f} s)")
        if self.trials is not None:
            self.trials.update(1)

    def close(self) -> None:
        self._end_step()
        if self.trials is not None:
            self.trials.close()
            self.trials = None


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def _figures(t: TrialRecord, objectives) -> str:
    return "  ".join(f"{name} {_cell(t.get(name))}" for name in objectives)


def unfinished(records: StudyRecords, size: int | None) -> str | None:
    """'12 of 38 configurations done' when an exhaustive study is not done yet; None when it is (or searches to a
    budget)."""
    if not size:
        return None
    from compactmind.study.records import FAILED_OF_ITSELF, TrialStatus

    done = sum(1 for t in records.trials if "duplicate_of" not in t.attrs and (
        t.state in ("COMPLETE", "PRUNED") and t.status != TrialStatus.SPARE.value or t.status in FAILED_OF_ITSELF))
    return f"{done} of {size} configurations done" if done < size else None


def resume_command(argv: list[str], storage_url: str | None = None) -> str:
    """The command line that resumes this study: the same one again, with a storage password masked (it is
    never printed; set it in $COMPACTMIND_STORAGE, PGPASSWORD or ~/.pgpass)."""
    import shlex

    from compactmind.study.storage import safe_url

    shown = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key == "--storage":
            arg = f"--storage={safe_url(value)}"
        elif shown and shown[-1] == "--storage":
            arg = safe_url(arg)
        shown.append(arg)
    return "compactmind " + shlex.join(shown)


def _vs_source(t: TrialRecord) -> str:
    """Against the file the model came from: a ratio when smaller, else how many times that file's size (a
    pruned model kept in FP32 can be 3x a 4-bit source: a negative ratio would hide that)."""
    value = t.get("ratio_vs_source")
    if not isinstance(value, float):
        return ""
    return f"; ratio vs source file {value:.4f}" if value >= 0 else f"; {1 - value:.2f}x the source file's size"


def summary(records: StudyRecords, out_dir: Path | None, seconds: float | None = None) -> str:
    dense = records.dense or {}
    best = records.best
    lines = [f"study {records.study}: {len(records.trials)} trials ({records.statuses})"
             + (f" in {seconds:.0f} s" if seconds is not None else "")]
    if records.source_note:
        lines.append(f"model:  {(records.model or {}).get('name')}, {records.source_note}")
    if dense:
        lines.append(f"dense:  perplexity {dense['perplexity']:.4f}  ratio 0.0000")
    if best:
        lines.append(f"best:   {_figures(best, records.objectives)}  ({best.get('bits_per_weight', 0):.2f} "
                     f"bits/weight{_vs_source(best)})  {best.pipeline}  [trial {best.number}]")
        if records.quality != "perplexity" and best.get("perplexity") is not None:
            lines.append(f"        test perplexity {best.get('perplexity'):.4f} (chosen on {records.quality}, "
                         "never on the test windows)")
        for row in records.selection_vs_test:
            if "test_vs_uniform" in row:
                lines.append(f"        trial {row['number']} ({row['baseline'] or 'searched'}): {records.quality} "
                             f"{row[records.quality]:.4g} ({row['selection_vs_uniform']:.3f}x uniform), test "
                             f"perplexity {row['perplexity']:.4f} ({row['test_vs_uniform']:.3f}x uniform)")
    else:
        lines.append(f"best:   no candidate reached the target ratio {records.target_ratio}")
    if out_dir is not None:
        lines.append(f"reports: {out_dir}/")
    return "\n".join(lines)


def _columns(records: StudyRecords) -> list[str]:
    extra = ["perplexity"] if records.quality != "perplexity" else []  # a dynamic study's test figure
    return list(records.objectives) + extra + ["bits_per_weight"]


def best(records: StudyRecords, pareto: bool) -> str:
    """The dense baseline, the best feasible trial and (pareto) the front, in one column order."""
    columns = _columns(records)
    dense = records.dense or {}
    rows = [("", "trial", *columns, "pipeline"),
            ("dense", "-", *[_cell(dense.get(c)) for c in columns], "-")]
    b = records.best
    rows.append(("best", b.number, *[_cell(b.get(c)) for c in columns], f"{b.pipeline}{_vs_source(b)}") if b else
                ("best", "-", *["-"] * len(columns), f"no feasible trial (ratio >= {records.target_ratio})"))
    if pareto:
        rows += [("front", t.number, *[_cell(t.get(c)) for c in columns], t.pipeline) for t in records.pareto_front]
    lines = [table(rows), f"trials: {records.statuses} (`compactmind compare` shows any of them; the reports give "
                          "every status and reason)"]
    if pareto:
        lines.append(f"front: the Pareto front over {', '.join(f'{k} ({v})' for k, v in records.objectives.items())}, "
                     "feasible trials only")
    if records.source_note:
        lines.append(f"{(records.model or {}).get('name')}: {records.source_note}")
    return "\n".join(lines)


def compare(records: StudyRecords, numbers: list[int]) -> str:
    """Trials side by side: pipeline, per-step parameters, figures, and deltas against the dense model."""
    trials = [records.trial(n) for n in numbers]
    dense = records.dense or {}
    q = records.quality
    params = sorted({k for t in trials for k in t.params if k != "pipeline"})
    rows = [("", "dense", *[f"trial {t.number}" for t in trials]),
            ("pipeline", "-", *[t.pipeline or "-" for t in trials]),
            ("status", "-", *[t.status or t.state for t in trials])]
    rows += [(k, "-", *[_cell(t.params.get(k)) for t in trials]) for k in params]
    for name in dict.fromkeys([q, "perplexity"]):
        base = dense.get(name)
        rows.append((name, _cell(base), *[_delta(t.get(name), base) for t in trials]))
    rows += [(name, _cell(dense.get(name)), *[_cell(t.get(name)) for t in trials])
             for name in ("compression_ratio", "bits_per_weight", "sparsity", "model_bytes")]
    if records.source_note:
        rows.append(("ratio_vs_source", "-", *[_cell(t.get("ratio_vs_source")) for t in trials]))
    return table(rows)


def _delta(value, base) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4f} ({value / base - 1:+.1%})" if isinstance(base, (int, float)) and base else _cell(value)


def methods_table() -> str:
    from compactmind.registry import all_methods

    rows = [("name", "kind", "grid", "parameters (grid values)", "what it does")]
    for name, m in sorted(all_methods().items()):
        params = "; ".join(f"{k}: {', '.join(map(str, s.grid()))}" for k, s in m.space.items()) or "-"
        rows.append((name, m.kind.value, str(m.grid_size()), params, m.summary))
    return table(rows)


def table(rows: list[tuple]) -> str:
    """Rows as aligned columns (the last column is not padded)."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
