"""The commands: each parses nothing and prints little, and calls one function of the study layer."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path

from compactmind.cli import console
from compactmind.cli.parser import config_of
from compactmind.errors import ConfigError

log = logging.getLogger("compactmind")


def _writable_dir(path: str) -> Path:
    """Check (creating nothing yet) that a folder can be made and written."""
    out = Path(path)
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"Cannot create the output folder {out}: {existing} is not a folder; pass another "
                          "--output_dir.")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"The output folder {out} is not writable; pass a writable --output_dir.")
    return out


def _run_and_report(cfg, out_dir: Path | None, argv: list[str], worker: bool = False) -> int:
    """Open the study, run its trials, write its reports. A signal takes effect at the next checkpoint anywhere
    in this (model load, baseline, levels, trials, reports): what is done stays done, the reports are written
    for whatever the study holds then, and the exit code says which signal it was (130 Ctrl-C, 143 SIGTERM)."""
    from compactmind import interrupt
    from compactmind.study import session as S

    started = time.perf_counter()
    opened = session = stop = None
    try:
        with console.Progress() as progress:
            opened = S.open_study(cfg)
            session = S.start(opened, progress)
            size = session.size
            progress.start(size or cfg.n_trials,
                           sum(t.state.is_finished() for t in opened.study.get_trials(deepcopy=False)) if size else 0)
            S.run_trials(session)
        _finish(opened, cfg, out_dir, worker, started)
    except interrupt.Interrupted as exc:
        stop = exc
        if opened is not None:
            _finish(opened, cfg, out_dir, worker, started)
    size = session.size if session is not None else None
    unfinished = console.unfinished(S.records_of(opened.study, cfg.storage), size) if opened else None
    if stop or unfinished:
        what = f"{stop.status} before the study was opened" if stop and opened is None else \
            stop.status if stop else None
        print(f"{': '.join(filter(None, [what, unfinished]))}; resume with: "
              f"{console.resume_command(argv, cfg.storage)}")
    return stop.exit_code if stop else 0


def _finish(opened, cfg, out_dir: Path | None, worker: bool, started: float) -> None:
    from compactmind.study import session as S

    records = S.records_of(opened.study, cfg.storage)
    if worker:
        S.publish(opened.study, records, cfg.storage)
        print(f"worker done: study {records.study} has {len(records.trials)} trials "
              f"({records.counts.get('COMPLETE', 0)} evaluated)")
        return
    log.info("writing the reports to %s", out_dir)
    try:
        S.write_reports(opened.study, records, cfg.storage, out_dir)
    except OSError as exc:
        raise ConfigError(f"Cannot write the reports to {out_dir}: {exc.strerror or exc}; free space or pass "
                          "another --output_dir, then run 'compactmind report'.") from None
    print(console.summary(records, out_dir, time.perf_counter() - started))


def cmd_run(args) -> int:
    cfg = config_of(args)
    out_dir = _writable_dir(cfg.output_dir or f"results/run_{datetime.now():%Y%m%d_%H%M%S}")
    return _run_and_report(cfg, out_dir, args.argv)


def cmd_create(args) -> int:
    from compactmind.study.session import open_session

    with console.Progress() as progress:
        session = open_session(config_of(args), progress)
    name = session.study.study_name
    print(f"study {name} is ready; start workers with: compactmind worker --study_name {name} --storage URL")
    return 0


def cmd_worker(args) -> int:
    from compactmind.study.session import joined_config

    return _run_and_report(joined_config(config_of(args)), None, args.argv, worker=True)


def cmd_eval(args) -> int:
    from compactmind import pipeline as pl
    from compactmind.executor import Executor, load

    spec = pl.parse(args.pipeline)
    cfg = config_of(args)
    loaded, data = load(cfg)
    with console.Progress() as progress:
        executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits, reusable=False, progress=progress)
        compressed = executor.compress(spec)
        result = executor.evaluate(cfg.batch_size)
    fp = compressed.footprint
    out = {"pipeline": str(spec), "perplexity": result.perplexity, "compression_ratio": fp.compression_ratio,
           "bits_per_weight": fp.bits_per_weight, "sparsity": fp.sparsity, "model_bytes": fp.model_bytes,
           "seq_len": data.seq_len, "windows": result.windows, "tokens": result.tokens,
           "dtype": str(loaded.dtype).replace("torch.", ""), "compress_seconds": compressed.seconds,
           "eval_seconds": result.seconds, "data": data.info["label"], "model": loaded.name}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['pipeline']}: perplexity {out['perplexity']:.4f}, compression ratio "
              f"{out['compression_ratio']:.4f} ({out['bits_per_weight']:.2f} bits/weight), {out['windows']} "
              f"windows of {out['seq_len']} tokens, {out['dtype']}")
    return 0


def cmd_methods(args) -> int:

    print(console.methods_table())
    return 0


def cmd_report(args) -> int:
    from compactmind.study.session import open_records, write_reports

    study, records = open_records(args.storage, args.study_name)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", args.study_name)[:80]  # a study name never becomes a path as it is
    out_dir = _writable_dir(args.output_dir or f"results/report_{safe}_{datetime.now():%Y%m%d_%H%M%S}")
    write_reports(study, records, args.storage, out_dir)
    print(console.summary(records, out_dir))
    return 0


def cmd_best(args) -> int:
    from compactmind.study.session import open_records

    _, records = open_records(args.storage, args.study_name)
    print(console.best(records, args.pareto))
    return 0 if records.best is not None else 1


def cmd_compare(args) -> int:
    from compactmind.study.session import open_records

    _, records = open_records(args.storage, args.study_name)
    try:
        numbers = [int(n) for n in args.trials.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--trials {args.trials!r} is not a list of trial numbers such as 4,7,12.") from None
    missing = [n for n in numbers if records.trial(n) is None]
    if not numbers or missing:
        raise ConfigError(f"Study {records.study} has no trial {', '.join(map(str, missing or ['given']))} (it has "
                          f"{len(records.trials)} trials, numbered from 0).")
    print(console.compare(records, numbers))
    return 0


def cmd_export(args) -> int:
    from compactmind.study.export import ExportMismatch, export_trial

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"The export folder {out} already exists and is not empty; pass a new --out.")
    _writable_dir(str(out))

    try:
        lines = export_trial(config_of(args), args.trial, out, args.verify, args.format)
    except ExportMismatch as exc:
        print("\n".join(exc.lines))
        raise
    print("\n".join(lines))
    return 0


def cmd_dashboard(args) -> int:
    from compactmind import dashboard
    from compactmind.study.storage import open_storage

    dashboard.serve(open_storage(args.storage, create=False), args.storage, args.host, args.port, args.artifact_dir,
                    access_log=args.verbose > 0, read_only_mode=args.read_only)
    return 0


COMMANDS = {"run": cmd_run, "create": cmd_create, "worker": cmd_worker, "eval": cmd_eval, "methods": cmd_methods,
            "report": cmd_report, "best": cmd_best, "compare": cmd_compare, "export": cmd_export,
            "dashboard": cmd_dashboard}


