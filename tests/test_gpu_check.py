"""scripts/gpu_check.sh is known to start: its --dry-run (the CPU, a small shape) writes the one JSON file a lent
GPU's run writes, with every stage measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import communicate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_with_dry_run(tmp_path):
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                            env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "check.json"),
                                 "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = communicate(proc, 540)  # the script's own bound is 480 s
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["device"] == "cpu" and result["gptq_block_seconds"] > 0
    assert {"load", "GPTQ W4 g128", "export gguf", "one assembly", "dynamic trial's evaluation"} <= set(result["scale"])
    assert abs(result["eval"]["ours_perplexity"] / result["eval"]["plain_perplexity"] - 1) < 1e-3
