"""The executor: one trial's work, and the one path every command takes to it: load the model and data a RunConfig names,
restore the pristine model, apply a pipeline, measure its footprint, evaluate its perplexity.

The study's objective, `compactmind eval`, `compactmind export` and scripts/quality.py all use `Executor`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from compactmind import data as data_mod
from compactmind import models
from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.errors import ConfigError
from compactmind.evaluate import Perplexity, perplexity
from compactmind.footprint import Footprint, Reference, measure
from compactmind.progress import SILENT, Progress

if TYPE_CHECKING:
    from compactmind.config import RunConfig

log = logging.getLogger(__name__)


def load(cfg: RunConfig) -> tuple[models.LoadedModel, data_mod.Dataset]:
    """The model and the tokenized data the settings name (text files are read and checked before the model is
    loaded, so a bad file fails fast)."""
    device = models.pick_device(cfg.gpu, cfg.cpu)
    dtype = models.pick_dtype(cfg.dtype, device)
    texts = data_mod.resolve_sources(cfg.data_path, cfg.calib_path).read()
    log.info("loading model %s on %s (%s)", cfg.model_path or "default (SmolLM2-135M)", device, str(dtype)[6:])
    loaded = models.load_model(cfg.model_path, torch.device("cpu") if cfg.offload else device, dtype)
    if cfg.offload:
        models.Onloader(loaded.model, device)
        loaded.device = device
    limit = loaded.max_positions or 2048
    seq_len = cfg.seq_len or min(2048, limit)
    if seq_len > limit:
        raise ConfigError(f"--seq_len {seq_len} is above the model's context of {limit} tokens; pass at most {limit}.")
    data = data_mod.prepare(loaded.tokenizer, texts, seq_len, cfg.data_samples, cfg.max_eval_windows, cfg.seed,
                            cfg.selection_windows if cfg.dynamic else 0)
    log.info("data: %s, %d windows of %d tokens (%d available); calibration: %s", data.info["label"],
             data.info["windows"], seq_len, data.info["windows_available"], data.info["calib_source"])
    return loaded, data




@dataclass(frozen=True)
class Compressed:
    pipeline: object  # the pl.Pipeline applied, or the dynamic.Profile assembled
    footprint: Footprint
    seconds: float


class Executor:
    """Runs pipelines on one loaded model. reusable=True keeps a snapshot of the pristine model (on its device
    when it fits, else in host memory) and restores it before each pipeline; reusable=False compresses once."""

    def __init__(self, loaded: models.LoadedModel, data: data_mod.Dataset, seed: int = 0, baseline_bits: int = 32,
                 reusable: bool = True, progress: Progress = SILENT):
        self.loaded, self.data, self.seed, self.progress = loaded, data, seed, progress
        self.reference = Reference.of(loaded.model, baseline_bits)
        self.calibration = Calibration(data.calib, on_block=progress.block)
        self.snapshot = models.Snapshot(loaded.model) if reusable else None
        self._state = "pristine"  # or "compressed", or "assembled" (a dynamic profile's units swapped in)
        self.assembly = None  # dynamic.Assembly: the profile the model holds, while assembled

    def use(self, data: data_mod.Dataset, seed: int) -> None:
        """Other data and seed for the next pipelines on the same model (one snapshot: another calibration draw
        of the same protocol, as scripts/quality.py measures)."""
        self.data, self.seed = data, seed
        self.calibration = Calibration(data.calib, on_block=self.progress.block)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def restore(self) -> None:
        if self._state != "pristine":
            if self.snapshot is None:
                raise RuntimeError("this executor compresses once (reusable=False)")
            self.snapshot.restore()
            self._state = "pristine"
            if self.assembly is not None:
                self.assembly.reset()

    def compress(self, pipeline: pl.Pipeline) -> Compressed:
        """Restore the pristine model, apply `pipeline` in place, and measure the result."""
        self.restore()
        self._state = "compressed"
        seconds = pl.apply_(self.model, pipeline, self.calibration, self.seed)
        return Compressed(pipeline, measure(self.model, self.reference), seconds)

    def assemble(self, db, profile) -> Compressed:
        """Make the model this profile of a level database (dynamic.py): from the pristine model the first
        time, then by swapping only the units whose option changed. `seconds` is the whole cost of a trial
        before its evaluation."""
        from compactmind.dynamic import Assembly

        started = time.perf_counter()
        if self._state != "assembled" or self.assembly is None or self.assembly.db is not db:
            self.restore()
            self.assembly = Assembly(db, self.model)
        self._state = "assembled"
        self.assembly.apply(profile)
        return Compressed(profile, db.footprint(profile, self.reference), time.perf_counter() - started)

    def evaluate(self, batch_size: int = 1, stop=None, windows: torch.Tensor | None = None) -> Perplexity:
        """Perplexity on the test windows (or on `windows`, e.g. a dynamic study's selection windows)."""
        windows = self.data.windows if windows is None else windows
        return perplexity(self.model, windows, batch_size, stop=stop, progress=self.progress.window)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets this process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory since the last reset: on the GPU (allocated by torch) and in host RAM (resident set)."""
    out = {}
    if device.type == "cuda":
        out["peak_device_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_host_memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out
