"""The dashboard on a real study: note, artifacts, and the Pareto-front page rendered in headless Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from compactmind.cli import main

from conftest import communicate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def study_db(tiny_model_dir, text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    storage = f"sqlite:///{tmp}/s.db"
    assert main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio", "0.5",
                 "--methods", "random_pruning,fp16", "--storage", storage, "--study_name", "dash",
                 "--output_dir", str(tmp / "out")]) == 0
    return storage, tmp


def test_study_note_and_report_plots_are_in_the_store(study_db):
    import optuna_dashboard

    storage, tmp = study_db
    study = optuna.load_study(study_name="dash", storage=storage)
    text = optuna_dashboard.get_note(study)
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert f"{report['dense']['perplexity']:.4f}" in text and "compression ratio >= 0.5" in text
    assert report["best"]["pipeline"] in text
    names = sorted(m.filename for m in optuna.artifacts.get_all_artifact_meta(study))
    assert names == ["search_space_analysis.html", "search_space_analysis.png"]
    assert (tmp / "artifacts").is_dir() and len(list((tmp / "artifacts").iterdir())) == 2
    assert study.metric_names == ["perplexity", "compression_ratio"]


def test_pareto_front_page_shows_the_trials_in_headless_chromium(study_db, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (scripts/install_test_services.sh installs it as root with apt)")
    storage, tmp = study_db
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "compactmind", "dashboard", "--storage", storage,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                studies = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read())
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read().decode()[-2000:]
                time.sleep(0.3)
        assert [s["study_name"] for s in studies["study_summaries"]] == ["dash"]
        url = f"http://127.0.0.1:{port}/dashboard/studies/1"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--virtual-time-budget=15000"]
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        # COMPACTMIND_SCREENSHOTS=folder keeps the screenshot for a person to look at
        shot = Path(os.environ.get("COMPACTMIND_SCREENSHOTS") or tmp_path) / "dashboard_pareto_front.png"
        subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.terminate()
        communicate(server, 30)
    study = optuna.load_study(study_name="dash", storage=storage)
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert "Pareto Front" in dom and "compression_ratio" in dom and "dash" in dom
    assert dom.count('class="point"') >= len(complete) > 0  # one marker per evaluated trial, at least
    assert shot.stat().st_size > 10_000


def test_a_read_only_dashboard_refuses_every_write_and_warns_when_exposed(tmp_path):
    import io

    import optuna

    from compactmind import dashboard
    from compactmind.study.storage import open_storage

    url = f"sqlite:///{tmp_path}/s.db"
    storage = open_storage(url)
    optuna.create_study(study_name="kept", storage=storage)
    app = dashboard.app(storage, url, read_only_mode=True)

    def call(method, path):
        from wsgiref.util import setup_testing_defaults

        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO(b""), "CONTENT_LENGTH": "0"}
        setup_testing_defaults(environ)
        status = []
        b"".join(app(environ, lambda s, h, *exc: status.append(s)))
        return status[0]

    assert call("DELETE", "/api/studies/1").startswith("403")
    assert call("GET", "/api/studies").startswith("200")
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["kept"]
    assert dashboard.exposure_warning("127.0.0.1", False) is None
    assert "--read_only" in dashboard.exposure_warning("0.0.0.0", False)
    assert "read-only" in dashboard.exposure_warning("0.0.0.0", True)
