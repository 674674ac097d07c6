"""Download scripts: their argument handling, and one clear sentence when the network is not there."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def script(name, *args):
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["download_model.py", "download_from_modelscope.py", "download_data.py"])
def test_missing_arguments_are_a_usage_error(name):
    done = script(name)
    assert done.returncode == 2 and "required" in done.stderr and "Traceback" not in done.stderr


def test_unknown_dataset_is_a_usage_error(tmp_path):
    done = script("download_data.py", str(tmp_path), "--dataset", "penn-treebank")
    assert done.returncode == 2 and "invalid choice" in done.stderr


@pytest.mark.parametrize("name,args", [("download_model.py", ["org/model"]), ("download_data.py", [])])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_download(name, args, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = script(name, *args, str(blocker / "out"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Cannot write to" in done.stderr


def _offline() -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


@pytest.mark.skipif(not _offline(), reason="this machine reaches the network; the offline message is not testable")
@pytest.mark.parametrize("name,args,source", [
    ("download_model.py", ["HuggingFaceTB/SmolLM2-135M"], "the Hugging Face hub"),
    ("download_from_modelscope.py", ["AI-ModelScope/SmolLM2-135M"], "ModelScope"),
    ("download_data.py", [], "the Hugging Face hub"),
])
def test_without_a_network_each_script_says_so_in_one_sentence(name, args, source, tmp_path):
    done = script(name, *args, str(tmp_path / "out"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Cannot reach {source}" in lines[0], done.stderr
    assert not (tmp_path / "out" / "test.txt").exists()
