"""Many workers on one study: SQLite and a real PostgreSQL server on 127.0.0.1. Each configuration must run
exactly once, and a worker killed with SIGKILL mid-trial must have its trial retried by another."""

import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest

from compactmind import pipeline as pl
from compactmind.cli import main
from conftest import communicate, finished_trials

METHODS = ["random_pruning", "fp16"]  # 16 configurations, hybrids among them


def finished_labels(storage, name):
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    # A replay (duplicate_of) reuses a measurement: a killed trial's retry that finds its configuration measured
    # meanwhile by a worker that took it in the moment it was held by no trial.
    done = [t.user_attrs.get("pipeline") for t in trials
            if t.state.name in ("COMPLETE", "PRUNED") and t.user_attrs.get("status") != "spare"
            and "duplicate_of" not in t.user_attrs]
    return done, trials


def start_workers(storage, name, n):
    cmd = [sys.executable, "-m", "compactmind", "-q", "worker", "--study_name", name, "--storage", storage]
    return [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(n)]


def create(tiny_model_dir, text_file, storage, name):
    rc = main(["-q", "create", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
               "--max_eval_windows", "60", "--data_samples", "2", "--target_ratio", "0.0",
               "--methods", ",".join(METHODS), "--storage", storage, "--study_name", name])
    assert rc == 0


def check_exactly_once(storage, name):
    done, trials = finished_labels(storage, name)
    expected = sorted(str(c) for c in pl.candidates(METHODS))
    assert sorted(done) == expected, "duplicated or missing configurations"
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    return trials


def measuring(db, worker) -> bool:
    """Whether worker (stopped, so this cannot change under the read) is inside a trial it has recorded as its
    own, with parameters (one the heartbeat will fail and another worker retry), after the study's first five.
    Read-only, never waiting long on a lock the stopped process may hold."""
    if finished_trials(db, timeout=0.2) < 5:
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2)
        try:
            return con.execute(
                "select count(*) from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
                "where t.state = 'RUNNING' and a.key = 'worker' and a.value_json = ? and exists "
                "(select 1 from trial_params p where p.trial_id = t.trial_id)", (json.dumps(worker),)
            ).fetchone()[0] == 1
        finally:
            con.close()
    except sqlite3.Error:  # locked by the stopped process's commit
        return False


class Reader(threading.Thread):
    """`compactmind report` in a loop on the study while the workers run (a reader holding the file open)."""

    def __init__(self, storage, name, out):
        super().__init__(daemon=True)
        self.cmd = [sys.executable, "-m", "compactmind", "-q", "report", "--study_name", name, "--storage", storage,
                    "--output_dir", str(out)]
        self.done, self.runs, self.errors = threading.Event(), 0, []

    def run(self):
        while not self.done.is_set():
            r = subprocess.run(self.cmd, capture_output=True, text=True, timeout=300)
            self.runs += 1
            if r.returncode != 0 and "No study named" not in r.stderr:
                self.errors.append(r.stderr[-1000:])
            self.done.wait(3.0)  # a reader now and then, not a third of the two cores


def run_three_workers(tiny_model_dir, text_file, storage, name, kill_one=False, reports_to=None):
    create(tiny_model_dir, text_file, storage, name)
    procs = start_workers(storage, name, 3)
    reader = Reader(storage, name, reports_to) if reports_to else None
    try:
        if reader:
            reader.start()
        killed = None
        if kill_one:  # stop the first worker, look at what it is doing, and kill it only inside a recorded trial
            deadline, worker = time.time() + 600, f"{socket.gethostname()}:{procs[0].pid}"
            while time.time() < deadline and killed is None and procs[0].poll() is None:
                procs[0].send_signal(signal.SIGSTOP)
                if measuring(storage[len("sqlite:///"):], worker):
                    procs[0].send_signal(signal.SIGKILL)
                    killed = worker
                procs[0].send_signal(signal.SIGCONT)
                time.sleep(0.05)
            assert killed is not None, "no trial was running to kill"
        for p in procs:
            _, err = communicate(p, 600)
            if p is not procs[0] or not kill_one:
                assert p.returncode == 0, err.decode()[-2000:]
                assert b"Traceback" not in err and b"failed by another worker" not in err, err.decode()[-2000:]
        if reader:
            reader.done.set()
            reader.join(300)
            assert reader.runs >= 1 and not reader.errors, reader.errors
    finally:  # a failed check leaves no worker or reader running into the next test
        for p in procs:
            if p.poll() is None:
                p.kill()
        if reader:
            reader.done.set()
    return check_exactly_once(storage, name), killed


def test_three_workers_on_sqlite_with_one_killed(alone, tiny_model_dir, text_file, tmp_path):
    storage = f"sqlite:///{tmp_path}/shared.db"
    trials, killed = run_three_workers(tiny_model_dir, text_file, storage, "w3", kill_one=True,
                                       reports_to=tmp_path / "reports")
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1  # the killed worker's trial (no live one): failed, retried by another worker
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    assert failed[0].user_attrs["worker"] == killed != retries[0].user_attrs["worker"]


def _pg_bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    return found[-1] if found else None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries are not installed (scripts/install_test_services.sh installs them "
                    "with apt-get as root)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e .[postgres])")
    root = Path(tempfile.mkdtemp(prefix="compactmind-pg-"))  # outside pytest's root-only folder
    data = root / "data"
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        os.chmod(root, 0o777)
    done = subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"initdb failed: {done.stdout[-1000:]} {done.stderr[-1000:]}"
    for _ in range(3):  # a free port can be taken by another process between its probe and the server's bind
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
                                         f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200", "start"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            break
    assert done.returncode == 0, f"pg_ctl start failed: {done.stdout[-1000:]} {done.stderr[-1000:]}"
    try:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE compactmind")
        con.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/compactmind"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_three_workers_on_postgresql(alone, tiny_model_dir, text_file, postgres, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts of a server storage go to ./storage/artifacts
    trials, _ = run_three_workers(tiny_model_dir, text_file, postgres, "pg3", reports_to=tmp_path / "reports")
    assert not [t for t in trials if t.state.name == "FAIL"]  # no live trial failed by another worker


def test_a_storage_password_never_shows_in_logs_reports_or_the_dashboard_note(tiny_model_dir, text_file, postgres,
                                                                               tmp_path, capsys, monkeypatch):
    import optuna_dashboard

    secret = "Sekr1t-pw"
    url = postgres.replace("postgres@", f"postgres:{secret}@")  # trust auth: the password is accepted, unused
    monkeypatch.chdir(tmp_path)  # artifacts of a server storage go to ./storage/artifacts
    args = ["-v", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
            "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio", "0.3", "--methods", "fp16",
            "--storage", url, "--study_name", "masked", "--output_dir", str(tmp_path / "out")]
    assert main(args) == 0
    assert main(["-v", "best", "--study_name", "masked", "--storage", url]) == 0
    printed = capsys.readouterr()
    assert "masked" in printed.out and "***" in printed.err  # the URL is logged, masked
    assert secret not in printed.out + printed.err
    for f in (tmp_path / "out").iterdir():
        assert secret.encode() not in f.read_bytes(), f.name
    study = optuna.load_study(study_name="masked", storage=url)
    assert "***" in optuna_dashboard.get_note(study) and secret not in optuna_dashboard.get_note(study)
    assert secret not in json.dumps(study.user_attrs)


def test_worker_refuses_a_missing_study(tmp_path, capsys):
    db = tmp_path / "empty.db"
    assert main(["-q", "worker", "--study_name", "nope", "--storage", f"sqlite:///{db}"]) == 1
    assert "does not exist" in capsys.readouterr().err
