"""Workers never fail each other's live trials, and no dead trial stays RUNNING: WAL mode, a grace period longer
than one write can wait on a lock, staleness on the database's clock, a heartbeat from a trial's creation,
orphans stamped, dead local processes failed at once, and a worker whose trial was failed under it goes on."""

import datetime
import logging
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from compactmind.study import storage as S
from compactmind.study.liveness import PROCESS_ATTR, HOST, fail_lost_trials

from conftest import communicate


@pytest.fixture()
def study(tmp_path):
    storage = S.open_storage(f"sqlite:///{tmp_path}/s.db")
    return optuna.create_study(study_name="live", storage=storage)


def _running(study, params=True, heartbeat_age_s=None, process=None):
    """A RUNNING trial as another worker would leave it: maybe parameters, a heartbeat of some age, a process."""
    storage = study._storage
    trial_id = storage.create_new_trial(study._study_id)
    if params:
        storage.set_trial_param(trial_id, "x", 0.5, optuna.distributions.FloatDistribution(0, 1))
    if process:
        storage.set_trial_system_attr(trial_id, PROCESS_ATTR, process)
    if heartbeat_age_s is not None:
        storage.record_heartbeat(trial_id)
        with sqlite3.connect(study._storage._backend.engine.url.database) as con:
            con.execute("update trial_heartbeats set heartbeat = datetime(heartbeat, ?) where trial_id = ?",
                        (f"-{heartbeat_age_s} seconds", trial_id))
    return storage.get_trial(trial_id)


def _state(study, trial):
    return study._storage.get_trial(trial._trial_id).state


def test_sqlite_studies_are_in_wal_mode_so_a_reader_never_blocks_a_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "SQLITE_BUSY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(S, "LOCKED_RETRIES", 0)  # a write that waited on the reader would fail, not retry
    storage = S.open_storage(f"sqlite:///{tmp_path}/s.db")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "wal")
    reader = sqlite3.connect(tmp_path / "s.db")
    assert reader.execute("pragma journal_mode").fetchone()[0] == "wal"
    reader.execute("begin")
    reader.execute("select count(*) from trials").fetchone()  # a dashboard or `report` in the middle of a read
    storage.set_study_user_attr(study_id, "written", True)  # journal mode: a wait of 0.5 s, then "locked"
    assert storage.get_study_user_attrs(study_id) == {"written": True}
    reader.rollback()
    reader.close()


def test_a_heartbeat_held_up_by_a_lock_for_as_long_as_a_write_can_wait_is_not_stale(study):
    held_up = _running(study, heartbeat_age_s=S.SQLITE_BUSY_TIMEOUT_S + S.HEARTBEAT_S)
    gone = _running(study, heartbeat_age_s=S.GRACE_S + 5)
    fail_lost_trials(study)
    assert _state(study, held_up) == TrialState.RUNNING
    assert _state(study, gone) == TrialState.FAIL


def test_an_old_trial_without_parameters_but_with_a_fresh_heartbeat_is_left_alone(study, tmp_path):
    slow_sampler = _running(study, params=False, heartbeat_age_s=0)  # a TPE or GP sample still being drawn
    with sqlite3.connect(tmp_path / "s.db") as con:
        old = (datetime.datetime.now() - datetime.timedelta(hours=1)).isoformat(" ")
        con.execute("update trials set datetime_start = ? where trial_id = ?", (old, slow_sampler._trial_id))
    fail_lost_trials(study)
    assert _state(study, slow_sampler) == TrialState.RUNNING


def test_a_trial_that_never_beat_gets_a_stamped_heartbeat_then_goes_stale_and_runs_again(study, tmp_path):
    orphan = _running(study)  # a retry popped from WAITING whose worker died before its first beat
    empty = _running(study, params=False)  # killed as Optuna created it: it held nothing
    fail_lost_trials(study)
    assert _state(study, orphan) == TrialState.RUNNING  # stamped, not failed: its owner may be alive
    with sqlite3.connect(tmp_path / "s.db") as con:
        assert con.execute("select count(*) from trial_heartbeats where trial_id = ?",
                           (orphan._trial_id,)).fetchone()[0] == 1
        con.execute("update trial_heartbeats set heartbeat = datetime(heartbeat, ?)", (f"-{S.GRACE_S + 5} seconds",))
    fail_lost_trials(study)
    assert _state(study, orphan) == TrialState.FAIL and _state(study, empty) == TrialState.FAIL
    retries = [t for t in study.get_trials() if "failed_trial" in t.system_attrs]
    assert [(t.system_attrs["failed_trial"], t.state) for t in retries] == [(orphan.number, TrialState.WAITING)]


def test_a_trial_whose_process_on_this_machine_is_gone_is_failed_at_once(study):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = _running(study, heartbeat_age_s=0, process=f"{HOST}:{dead.stdout.strip()}:1")
    alive = _running(study, heartbeat_age_s=0, process=f"{HOST}:{__import__('os').getpid()}:-")
    elsewhere = _running(study, heartbeat_age_s=0, process="another-host:1:1")
    fail_lost_trials(study)
    assert _state(study, gone) == TrialState.FAIL
    assert _state(study, alive) == TrialState.RUNNING and _state(study, elsewhere) == TrialState.RUNNING


def test_the_retry_of_a_dead_process_trial_is_not_taken_for_dead_before_its_first_beat(study):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = _running(study, heartbeat_age_s=0, process=f"{HOST}:{dead.stdout.strip()}:1")
    fail_lost_trials(study)
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert _state(study, killed) == TrialState.FAIL and len(retry) == 1 and retry[0].params == killed.params
    assert PROCESS_ATTR not in retry[0].system_attrs  # the dead process is the killed trial's, not the copy's
    assert study._storage.set_trial_state_values(retry[0]._trial_id, TrialState.RUNNING)  # a worker takes it
    fail_lost_trials(study)  # another worker looks before the taker's first beat: the copy is stamped, not failed
    assert _state(study, retry[0]) == TrialState.RUNNING


_FAILED_UNDER_IT = """
import sys
import optuna
from optuna.trial import TrialState
from compactmind import cli
from compactmind.study import spaces, storage as S

url, score, failed = sys.argv[1], spaces.Scorer.score, []

def score_as_another_worker_fails_the_trial(self, *args, **kwargs):
    if not failed:  # another worker, on its own connection, calls the first measured trial stale
        study = optuna.load_study(study_name="lost", storage=S.open_storage(url, create=False))
        running = [t for t in study.get_trials() if t.state == TrialState.RUNNING and t.params]
        if running:
            study._storage.set_trial_state_values(running[0]._trial_id, state=TrialState.FAIL)
            failed.append(running[0].number)
            print(f"failed trial {failed[0]}", flush=True)
    return score(self, *args, **kwargs)

spaces.Scorer.score = score_as_another_worker_fails_the_trial
sys.argv = ["compactmind", *sys.argv[2:]]
cli.entry()
"""


def test_a_worker_whose_trial_was_failed_under_it_says_so_and_goes_on(tiny_model_dir, text_file, tmp_path):
    # The other worker's write lands while the trial is measured: at a fixed point, never a race with a poller.
    url = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
            "--max_eval_windows", "4", "--data_samples", "1", "--target_ratio", "0.0", "--methods", "fp16,bf16",
            "--no_hybrids", "--storage", url, "--study_name", "lost", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", _FAILED_UNDER_IT, url, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = communicate(proc, 300)
    assert proc.returncode == 0 and "failed trial " in out, err[-3000:]
    failed = int(out.split("failed trial ")[1].split()[0])
    assert "Traceback" not in err and f"trial {failed} was failed by another worker" in err
    study = optuna.load_study(study_name="lost", storage=url)
    assert study.trials[failed].state == TrialState.FAIL
    done = sorted(t.user_attrs["pipeline"] for t in study.trials if t.state == TrialState.COMPLETE)
    assert done == ["bf16", "fp16"]  # the lost configuration ran again


def test_two_runs_creating_one_study_name_with_different_settings_never_both_proceed(alone, tmp_path, monkeypatch):
    from compactmind.config import RunConfig
    from compactmind.errors import StorageError
    from compactmind.study import session

    storage = S.open_storage(f"sqlite:///{tmp_path}/s.db")
    describe, first_inside = session._describe, threading.Event()

    def slow_describe(*args):  # the first creator is slow to describe the study it made
        first_inside.set()
        time.sleep(0.5)
        describe(*args)

    monkeypatch.setattr(session, "_describe", slow_describe)
    outcome = {}

    def create(key, target):
        cfg = RunConfig(target_ratio=target, storage=f"sqlite:///{tmp_path}/s.db")
        try:
            session.create_or_resume(storage, "race", {"target_ratio": target}, {}, cfg)
            outcome[key] = "proceeds"
        except StorageError as exc:
            outcome[key] = str(exc)

    first = threading.Thread(target=create, args=("first", 0.5))
    first.start()
    first_inside.wait(10)
    second = threading.Thread(target=create, args=("second", 0.7))
    second.start()
    first.join()
    second.join()
    assert outcome["first"] == "proceeds"
    assert "target_ratio (the study: 0.5; this run: 0.7)" in outcome["second"]


_TAKER = """
import sys, time, warnings
import optuna
from compactmind.study import storage as S
warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="q", storage=S.open_storage(sys.argv[1]))
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
print(" ".join(str(study.ask().number) for _ in range(20)))
"""


def test_workers_taking_enqueued_trials_at_the_same_instant_never_take_the_same_one(alone, tmp_path):
    # Optuna takes a WAITING trial by reading its state, then writing RUNNING: unless the read is inside the
    # write's transaction, two workers both see WAITING and both run that trial (seen as 29 trials from 3x10).
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="q", storage=S.open_storage(url))
    for i in range(60):
        study.enqueue_trial({"x": i})
    start = str(time.time() + 6)  # every process imported and connected, then all ask at once
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, url, start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(3)]
    taken = []
    for p in procs:
        out, err = communicate(p, 120)
        assert p.returncode == 0, err.decode()[-2000:]
        taken += out.split()
    assert len(taken) == 60 and len(set(taken)) == 60
    assert len(study.trials) == 60


def test_a_trial_failed_by_another_worker_while_optuna_tells_it_is_dropped_in_one_line(study, monkeypatch, caplog):
    # The moment between Optuna's check that the trial still runs and its write of the result: a peer fails it
    # there (here: from the sampler's after_trial, which Optuna calls in that moment).
    from optuna.samplers import RandomSampler

    from compactmind.study import session
    from compactmind.study.liveness import Beating

    class PeerFailsItAsItIsTold(RandomSampler):
        def after_trial(self, study, trial, state, values):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

    monkeypatch.setattr(session, "objective", lambda ctx, trial: trial.suggest_float("x", 0, 1))
    study.sampler = Beating(PeerFailsItAsItIsTold())
    ran = []
    with caplog.at_level(logging.WARNING, logger="compactmind"):  # an earlier in-process `-q` run set ERROR
        assert session._optimize(study, None, ran, n_trials=2) is True  # dropped, the worker goes on
    assert len(ran) == 1 and _state(study, ran[0]) == TrialState.FAIL
    said = [r.getMessage() for r in caplog.records if r.name.startswith("compactmind")]
    assert len(said) == 1 and f"trial {ran[0].number} was failed by another worker" in said[0]


def test_checking_the_storage_again_keeps_the_processs_sqlite_locks(tmp_path):
    """A process that holds a study open and checks the storage again (a drill, the dashboard, a second command in
    one process) must not drop its SQLite locks: were they dropped, another process's last close would delete the
    WAL under it and its next reads would fail as a malformed database (CI saw a drill's final check fail so)."""
    url = f"sqlite:///{tmp_path}/s.db"
    writer = ("import sys, optuna\n"
              "from compactmind.study import storage as S\n"
              "s = optuna.create_study(study_name='w', storage=S.open_storage(sys.argv[1]), load_if_exists=True)\n"
              "for _ in range(int(sys.argv[2])):\n"
              "    t = s.ask(); t.set_user_attr('pad', 'x' * 2000); s.tell(t, 1.0)\n")
    subprocess.run([sys.executable, "-c", writer, url, "5"], check=True, capture_output=True)
    held = []  # every storage stays open, as in a long-lived reader
    for expected in (5, 205, 405):
        held.append(S.open_storage(url, create=False, readonly=True))
        assert len(S.load_study(held[-1], "w").trials) == expected
        subprocess.run([sys.executable, "-c", writer, url, "200"], check=True, capture_output=True)
        S.check_storage(url, create=False)  # raised "holds no Optuna studies" when the locks were gone
        with sqlite3.connect(f"file:{tmp_path}/s.db?mode=ro", uri=True) as con:
            assert con.execute("select count(*) from trials").fetchone() == (expected + 200,)
