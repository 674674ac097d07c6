"""What the command line prints: progress bars (on a terminal) or plain log lines (elsewhere), and the tables
of `run`, `best` and `methods`. Only the CLI uses this module."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from compactmind.study.records import StudyRecords, TrialRecord

log = logging.getLogger("compactmind")


class Progress:
    """On a terminal: a bar over trials and, below it, one over the windows of the running evaluation, with
    each finished trial printed above them. Elsewhere (a log file, CI): plain log lines only."""

    def __init__(self, total: int | None, done: int = 0):
        self.total = total
        self.on = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
        self.windows = None
        if self.on:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.trials = tqdm(total=total, initial=min(done, total or done), unit="trial", desc="trials",
                               position=0, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def line(self, text: str) -> None:
        if self.on:
            self.trials.write(text, file=sys.stderr)
        else:
            log.info(text)

    def trial_done(self, rec: dict) -> None:
        ppl = rec.get("perplexity")
        figures = f"ppl {ppl:.4g}" if isinstance(ppl, float) else "ppl -"
        ratio = rec.get("compression_ratio")
        figures += f", ratio {ratio:.4f}" if isinstance(ratio, float) else ""
        took = rec.get("compress_seconds", 0.0) + rec.get("eval_seconds", 0.0)
        of = f"/{self.total}" if self.total else ""
        self.line(f"[trial {rec['number'] + 1}{of}] {rec.get('pipeline')}: {figures} ({rec.get('status')}, "
                  f"{took:.1f} s)")
        if self.on:
            self.trials.update(1)

    def window(self, done: int, total: int) -> None:
        if not self.on:
            return
        if self.windows is None:
            self.windows = self._tqdm(total=total, unit="window", desc="evaluating", position=1, leave=False,
                                      dynamic_ncols=True)
        self.windows.update(done - self.windows.n)
        if done >= total:
            self.windows.close()
            self.windows = None

    def close(self) -> None:
        if self.on:
            if self.windows is not None:
                self.windows.close()
            self.trials.close()


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def _figures(t: TrialRecord, objectives) -> str:
    return "  ".join(f"{name} {_fmt(t.get(name))}" for name in objectives)


def summary(records: StudyRecords, out_dir: Path | None, seconds: float | None = None) -> str:
    counts = records.counts
    dense = records.dense or {}
    best = records.best
    lines = [f"study {records.study}: {len(records.trials)} trials "
             f"({counts.get('COMPLETE', 0)} evaluated, {counts.get('PRUNED', 0)} pruned/infeasible/invalid, "
             f"{counts.get('FAIL', 0)} failed)" + (f" in {seconds:.0f} s" if seconds is not None else "")]
    if dense:
        lines.append(f"dense:  perplexity {dense['perplexity']:.4f}  ratio 0.0000")
    if best:
        lines.append(f"best:   {_figures(best, records.objectives)}  ({best.get('bits_per_weight', 0):.2f} "
                     f"bits/weight)  {best.pipeline}  [trial {best.number}]")
    else:
        lines.append(f"best:   no candidate reached the target ratio {records.target_ratio}")
    if out_dir is not None:
        lines.append(f"reports: {out_dir}/")
    return "\n".join(lines)


def best(records: StudyRecords, pareto: bool) -> str:
    if records.best is None:
        lines = [f"no feasible trial (ratio >= {records.target_ratio}) in study {records.study}"]
    else:
        b = records.best
        lines = [f"trial {b.number}: {b.pipeline}  {_figures(b, records.objectives)}"]
    if pareto:
        lines.append(f"Pareto front ({', '.join(f'{k}: {v}' for k, v in records.objectives.items())}):")
        lines += [f"  trial {t.number}: {_figures(t, records.objectives)}  {t.pipeline}" for t in records.pareto_front]
    return "\n".join(lines)


def methods_table() -> str:
    from compactmind.registry import all_methods

    rows = [("name", "kind", "parameters", "grid")]
    for name, m in sorted(all_methods().items()):
        params = "; ".join(f"{k}: {', '.join(map(str, s.grid()))}" for k, s in m.space.items()) or "-"
        rows.append((name, m.kind.value, params, str(m.grid_size())))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)
