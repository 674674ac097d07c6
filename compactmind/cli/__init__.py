"""Command line: `compactmind run | create | worker | eval | methods | report | best | export | dashboard`.

The CLI owns argument parsing (parser.py), logging, printing and progress (console.py); each command
(commands.py) calls one function of the study layer. Bad input ends with one sentence on stderr and a non-zero
exit code: 1 for a problem with the input or environment, 2 for a malformed command line, 130 after Ctrl-C.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import signal
import sys

from compactmind import interrupt
from compactmind.cli.commands import COMMANDS
from compactmind.cli.parser import apply_study_file, build_parser, parse_config
from compactmind.errors import CompactMindError

__all__ = ["build_parser", "entry", "main", "parse_config"]


def _setup_logging(verbose: int, quiet: bool) -> None:
    """compactmind's lines on stderr: INFO by default, DEBUG with -v, only errors with -q; other libraries say
    only errors (warnings with -v, everything with -vv)."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO if verbose < 2 else logging.DEBUG,
                        format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("compactmind").setLevel(level)
    for noisy in ("transformers", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose == 0 else logging.WARNING if verbose == 1
                                          else logging.DEBUG)


def _quiet_libraries(verbose: int) -> None:
    """Optuna's and transformers' own chatter, set once they are needed (importing them costs seconds)."""
    import warnings

    import optuna
    import transformers

    # Heartbeats and stale-trial handling work as documented but Optuna still flags them experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Failed trials are reported by our own log line with their reason; Optuna would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _warn_password_on_command_line(argv: list[str]) -> None:
    for i, arg in enumerate(argv):
        url = argv[i + 1] if arg == "--storage" and i + 1 < len(argv) else arg.partition("=")[2] \
            if arg.startswith("--storage=") else None
        if not url:
            continue
        from sqlalchemy.engine import make_url

        try:
            password = make_url(url).password
        except Exception:  # not a URL: the storage check says so later
            password = None
        if password:
            logging.getLogger("compactmind").warning(
                "the storage password is on the command line, where `ps` shows it to every user of this machine; "
                "set COMPACTMIND_STORAGE instead, or keep it in PGPASSWORD / ~/.pgpass")


def _storage_trouble(exc: Exception) -> bool:
    """Whether the storage itself failed (only then is Optuna loaded: a command that never opened it cannot)."""
    if "optuna" not in sys.modules:
        return False
    from compactmind.study.storage import StorageTrouble

    return isinstance(exc, StorageTrouble)


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to stderr: a run that seems to hang explains itself."""
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows), or stderr is not a file (captured)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        apply_study_file(parser, argv)
        args = parser.parse_args(argv)
    except CompactMindError as exc:
        print(f"compactmind: error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv  # what resumes the study: the same command line
    _setup_logging(args.verbose, args.quiet)
    if args.command != "methods":
        _quiet_libraries(args.verbose)
    _warn_password_on_command_line(argv)
    _stacks_on_sigusr1()
    try:
        with interrupt.guard():
            code = COMMANDS[args.command](args)
            late = interrupt.pending()  # a signal after the last checkpoint: the work is done, the exit says so
            return late.exit_code if late and code == 0 else code
    except CompactMindError as exc:
        print(f"compactmind: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"compactmind: error: {exc.strerror or exc}{where}; free space or fix the permissions, then run the same "
              "command again to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        stop = exc if isinstance(exc, interrupt.Interrupted) else interrupt.Interrupted()
        print(f"compactmind: {stop.status}", file=sys.stderr)
        return stop.exit_code
    except Exception as exc:
        if not _storage_trouble(exc):
            raise
        from compactmind.study.storage import scrub

        first = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                      getattr(args, "storage", "") or "")
        print(f"compactmind: error: the study storage failed ({first[:300]}); check it (disk space, a damaged "
              "file, the server) and run the same command again to resume.", file=sys.stderr)
        return 1


def entry() -> None:
    """The `compactmind` program: the command, then the exit. Python puts the default signal handlers back before
    its teardown (seconds with a model loaded), so a signal there would end the process as killed (-15), its
    buffered output lost. The exit therefore closes the storages, runs the exit hooks with a signal still
    answered by compactmind's status (interrupt.end_on_signal), and ends the process without that teardown:
    every result is written by then."""
    code = main()
    interrupt.end_on_signal()
    if "compactmind.study.storage" in sys.modules:
        sys.modules["compactmind.study.storage"].close_all()
    atexit._run_exitfuncs()  # logging's flush and any hook a library registered
    interrupt.flush_stdio()
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    entry()
