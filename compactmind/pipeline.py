"""Pipelines: an ordered list of (method, parameters) steps, their text form, the candidate list of a study,
and applying a pipeline to a model.

Text form (what a study records and `--pipeline` takes): `l2_pruning(sparsity=0.2, scope=mlp) -> int8_sq(alpha=0.5)`.
Parameters left out take the method's defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass
from typing import Any

from compactmind import interrupt
from compactmind.calibration import Calibration
from compactmind.errors import CompactMindError, IncompatiblePipelineError, PipelineError
from compactmind.registry import Kind, all_methods, get_method


def _value_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Step:
    method: str
    params: Any  # the method's Params instance

    @property
    def values(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    def __str__(self) -> str:
        """Every parameter, except fixed settings (a one-value declared space) left at their default."""
        method = get_method(self.method)
        defaults = method.Params()
        shown = {k: v for k, v in self.values.items()
                 if not (len(method.space[k].grid()) == 1 and v == getattr(defaults, k))}
        inner = ", ".join(f"{k}={_value_text(v)}" for k, v in shown.items())
        return f"{self.method}({inner})" if inner else self.method


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    @functools.cached_property
    def label(self) -> str:
        return " -> ".join(map(str, self.steps)) if self.steps else "dense"

    def __str__(self) -> str:
        return self.label

    @property
    def shape(self) -> str:
        """The methods in order, without parameters (the first choice a sampler makes)."""
        return " -> ".join(s.method for s in self.steps)

    @property
    def is_hybrid(self) -> bool:
        return len(self.steps) > 1

    def flat_params(self) -> dict[str, Any]:
        """Search parameters as Optuna sees them: the shape, then `method.param` for every step."""
        out: dict[str, Any] = {"pipeline": self.shape}
        for step in self.steps:
            out.update({f"{step.method}.{k}": v for k, v in step.values.items()})
        return out

    def to_json(self) -> list[dict]:
        return [{"method": s.method, "params": s.values} for s in self.steps]


_STEP = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$", re.S)


def parse(text: str) -> Pipeline:
    """Parse pipeline text; raises PipelineError with the offending part named."""
    if text.strip() in ("", "dense", "none"):
        return Pipeline(())
    steps = []
    for part in text.split("->"):
        match = _STEP.match(part)
        if not match:
            raise PipelineError(f"Cannot parse pipeline step {part.strip()!r}; write it as name(param=value, ...).")
        name, args = match.group(1), match.group(2) or ""
        try:
            method = get_method(name)
        except CompactMindError as exc:
            raise PipelineError(str(exc)) from exc
        values: dict[str, Any] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in method.space:
                raise PipelineError(f"{name} has no parameter {key!r}; its parameters are "
                                    f"{', '.join(method.space) or 'none'}.")
            if key in values:
                raise PipelineError(f"{name} sets {key} twice; give each parameter once.")
            try:
                values[key] = method.space[key].parse(raw.strip())
            except ValueError as exc:
                raise PipelineError(f"{name}: bad value for {key}: {exc}.") from exc
        try:
            steps.append(Step(name, method.make_params(values)))
        except IncompatiblePipelineError as exc:
            raise PipelineError(str(exc)) from exc
    return check_order(Pipeline(tuple(steps)))


def check_order(pipeline: Pipeline) -> Pipeline:
    if len({s.method for s in pipeline.steps}) != len(pipeline.steps):
        raise PipelineError("A pipeline cannot use the same method twice.")
    for step in pipeline.steps[:-1]:
        if get_method(step.method).final:
            raise PipelineError(f"{step.method} must be a pipeline's last step: its stored blocks hold the weights, "
                                "and a later step would change them.")
    return pipeline


def search_spaces(method_names: list[str] | None = None,
                  grids: dict[str, dict[str, list]] | None = None) -> dict[str, dict]:
    """The effective search space of each chosen method (declared, or the exact values a study file lists)."""
    methods = all_methods()
    names = sorted(methods) if method_names is None else list(method_names)
    for name in list(names) + list(grids or {}):
        get_method(name)  # unknown names fail here with the list of known ones
    unused = sorted(set(grids or {}) - set(names))
    if unused:
        raise PipelineError(f"The study gives a grid for {', '.join(unused)}, which it does not search; add "
                            f"{'it' if len(unused) == 1 else 'them'} to --methods or remove the grid.")
    return {n: methods[n].search_space((grids or {}).get(n)) for n in names}


def candidates(method_names: list[str] | None = None, hybrids: bool = True,
               grids: dict[str, dict[str, list]] | None = None) -> list[Pipeline]:
    """Every single method over its grid, then every ordered pruning/quantization pair over both grids."""
    names = list(search_spaces(method_names, grids))
    chosen = [get_method(n) for n in names]
    grid = {m.name: m.grid((grids or {}).get(m.name)) for m in chosen}
    singles = [Pipeline((Step(m.name, p),)) for m in chosen for p in grid[m.name]]
    pairs = []
    if hybrids:
        for a in chosen:
            for b in chosen:
                if {a.kind, b.kind} == {Kind.PRUNING, Kind.QUANTIZATION} and a.hybrid and b.hybrid:
                    pairs += [Pipeline((Step(a.name, pa), Step(b.name, pb)))
                              for pa in grid[a.name] for pb in grid[b.name]]
    return singles + pairs


def distinct(model, candidates: list[Pipeline]) -> tuple[list[Pipeline], list[tuple[Pipeline, Pipeline]]]:
    """The candidates that do different things to this model, and (dropped, same as) for the others (e.g. two
    l2_pruning head fractions that remove the same number of heads)."""
    seen: dict = {}
    kept, dropped = [], []
    for c in candidates:
        try:
            check(model, c)
            key = tuple((s.method, get_method(s.method).effect(model, s.params)) for s in c.steps)
        except CompactMindError:
            key = ("refused", str(c))  # its trial records the refusal and the reason
        if key in seen:
            dropped.append((c, seen[key]))
        else:
            seen[key] = c
            kept.append(c)
    return kept, dropped


def check(model, pipeline: Pipeline) -> None:
    """Cheap shape checks of every step before any work (raises IncompatiblePipelineError)."""
    for step in pipeline.steps:
        get_method(step.method).check(model, step.params)


def apply_(model, pipeline: Pipeline, calib: Calibration | None, seed: int) -> float:
    """Apply the steps in order to `model` (in place); returns the seconds spent."""
    start = time.perf_counter()
    check(model, pipeline)
    for i, step in enumerate(pipeline.steps):
        interrupt.checkpoint()
        if calib is not None:
            calib.model_is_dense = i == 0
            calib.step = str(step)
        method = get_method(step.method)
        method.apply_(model, step.params, calib if method.calibrates(step.params) else None, seed + i)
    return time.perf_counter() - start
