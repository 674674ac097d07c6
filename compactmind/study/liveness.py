"""Which RUNNING trials still have a live process behind them, decided so that no worker ever fails another's live
trial and no dead one stays RUNNING.

- Every trial beats from the moment it exists: `Beating` wraps the study's sampler and records the first
  heartbeat in `before_trial` (inside Optuna's `ask`, before any parameter is sampled), then keeps beating from
  a thread until `after_trial`, so a slow sampler (TPE, GP) cannot make a live trial look stale. It also records
  the process (`host:pid:start time`) on the trial.
- Staleness is Optuna's: a heartbeat older than the grace period, both read from the database's clock (UTC on
  SQLite), never from a host's local time. The grace period (storage.GRACE_S) outlasts the longest wait of one
  write on a lock, so a worker whose beats are held up by a lock is never taken for dead.
- A RUNNING trial with no heartbeat at all (its process died in the moment between creating it and its first
  beat, e.g. a retry popped from WAITING) gets one stamped by the first worker that sees it: then it goes stale
  like any other, and is failed and retried.
- A RUNNING trial whose process ran on this machine and is gone (kill -9, a crash) is failed at once and
  retried, without waiting for the grace period.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import warnings
from pathlib import Path

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from compactmind.study.storage import HEARTBEAT_S, PROCESS_ATTR, STAMPED_ATTR

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) and whether it is a zombie; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _this_process() -> str:
    return f"{HOST}:{os.getpid()}:{_start_time(os.getpid()) or '-'}"


def gone(process: str) -> bool:
    """Whether a process recorded on a trial ran on this machine and is no longer running."""
    parts = process.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST or not parts[1].isdigit():
        return False  # another machine's: its heartbeat decides
    pid, started = int(parts[1]), parts[2]
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    now = _start_time(pid)
    return now is None or (started != "-" and now != started)  # exited, a zombie, or the pid was reused


class _Beat:
    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.storage.record_heartbeat(trial_id)
        self.thread = threading.Thread(target=self._run, name=f"compactmind-heartbeat-{trial_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.storage.record_heartbeat(self.trial_id)

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=HEARTBEAT_S)


class Beating(BaseSampler):
    """A sampler that beats for its trials from their creation (see the module docstring) and otherwise asks
    `inner` for everything."""

    def __init__(self, inner: BaseSampler):
        self.inner = inner
        self._beat: _Beat | None = None
        self.process = _this_process()
        self.trial_number: int | None = None  # the trial this process took last
        self.trial_id: int | None = None

    def before_trial(self, study, trial):
        self.end()
        self.trial_number, self.trial_id = trial.number, trial._trial_id
        storage = study._storage
        if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
            self._beat = _Beat(storage, trial._trial_id)
        storage.set_trial_system_attr(trial._trial_id, PROCESS_ATTR, self.process)
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        try:
            self.inner.after_trial(study, trial, state, values)
        finally:
            self.end()

    def end(self) -> None:
        if self._beat is not None:
            self._beat.end()
            self._beat = None

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self):
        self.inner.reseed_rng()


def fail_lost_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials no process runs any more (and retry them, as the heartbeat does); stamp a heartbeat
    on those that never had one."""
    storage = study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a heartbeat older than the grace period, on the database's clock
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        process = t.system_attrs.get(PROCESS_ATTR)
        if process is None and not t.system_attrs.get(STAMPED_ATTR):
            storage.set_trial_system_attr(t._trial_id, STAMPED_ATTR, True)
            storage.record_heartbeat(t._trial_id)
        elif process is not None and gone(process):
            try:
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # finished meanwhile, or another worker failed it first
            log.info("trial %d: its process (%s) is gone; failed, to be run again", t.number, process)
            callback = storage.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(study, copy.deepcopy(storage.get_trial(t._trial_id)))
