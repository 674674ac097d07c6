"""Typed search-space specs a method declares for its parameters.

A spec knows its grid (the values an exhaustive search visits), whether a value has the right type
(`accepts`), and how to read a value from pipeline text. The
declared range is the default search range, not the limit of what the method can do: pipeline text and study
files may use other valid values, which the method's `Params` checks. The search layer turns specs into
Optuna distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compactmind.errors import RegistryError

Value = int | float | str | bool


@dataclass(frozen=True)
class Categorical:
    """A set of choices. `searched` (a subset) is what an exhaustive search visits by default when not every
    valid choice is worth a trial; pipeline text and study files may still use any choice."""

    choices: tuple[Value, ...]
    searched: tuple[Value, ...] | None = None

    def __init__(self, choices, searched=None):
        object.__setattr__(self, "choices", tuple(choices))
        object.__setattr__(self, "searched", tuple(searched) if searched is not None else None)
        if not self.choices:
            raise RegistryError("A Categorical search space needs at least one choice.")
        if self.searched is not None and (not self.searched or not set(self.searched) <= set(self.choices)):
            raise RegistryError("A Categorical's searched values must be some of its choices.")

    def grid(self) -> list[Value]:
        return list(self.searched if self.searched is not None else self.choices)

    def _kind(self) -> type | None:
        """bool, int or float when every choice has that type: then other values of the type are valid too
        (bits=5 or group_size=32 outside the declared grid); strings form a closed set."""
        for kind in (bool, int, float):
            if all(type(c) is kind for c in self.choices):
                return kind
        return None

    def accepts(self, value: Any) -> bool:
        kind = self._kind()
        if kind is None:
            return value in self.choices
        return type(value) is kind or (kind is float and type(value) is int)

    def parse(self, text: str) -> Value:
        kind = self._kind()
        if kind is bool and text in ("True", "False", "true", "false"):
            return text.lower() == "true"
        if kind in (int, float):
            return kind(text)
        for choice in self.choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, self.choices))}")


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    step: int = 1

    def __post_init__(self):
        if self.step <= 0 or self.high < self.low:
            raise RegistryError(f"Int({self.low}, {self.high}, step={self.step}) is not a valid range.")

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def parse(self, text: str) -> int:
        return int(text)


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    step: float | None = None

    def __post_init__(self):
        if self.high < self.low or (self.step is not None and self.step <= 0):
            raise RegistryError(f"Float({self.low}, {self.high}, step={self.step}) is not a valid range.")
        if self.step is not None:
            n = (self.high - self.low) / self.step
            if abs(n - round(n)) > 1e-6:
                raise RegistryError(f"Float({self.low}, {self.high}, step={self.step}): the step must divide the range.")

    def grid(self) -> list[float]:
        if self.step is None:
            return [self.low] if self.low == self.high else [self.low, self.high]
        n = round((self.high - self.low) / self.step)
        return [round(self.low + i * self.step, 10) for i in range(n + 1)]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def parse(self, text: str) -> float:
        return float(text)


Spec = Categorical | Int | Float
