"""The method registry: `@register_method("name")` on a `Method` subclass adds it.

A method declares its kind, its typed parameters (a frozen dataclass `Params`) and a search space whose keys
equal those parameters. The registry checks that when the class is registered and refuses duplicate names.
Third-party packages register methods by exposing a module under the entry-point group `compactmind.methods`;
importing that module runs its decorators.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import logging
import math
from typing import Any, ClassVar

from compactmind.errors import IncompatiblePipelineError, RegistryError
from compactmind.space import Categorical, Spec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "compactmind.methods"


class Kind(str, enum.Enum):
    PRUNING = "pruning"
    QUANTIZATION = "quantization"


class Method:
    """Base class of a compression method. Subclasses set the class attributes and implement `apply_`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `compactmind methods`
    kind: ClassVar[Kind]
    Params: ClassVar[type]
    space: ClassVar[dict[str, Spec]]
    needs_calibration: ClassVar[bool] = False  # some setting uses the calibration samples (see `calibrates`)
    # Parameters that leave the model unchanged, if the method has such a setting.
    identity: ClassVar[Any] = None
    # Bumped whenever what the method makes of a model changes (how it rounds, what it keeps, a default): a
    # study records the version of every method it uses and refuses to resume under another one.
    version: ClassVar[int] = 1
    # False: not paired with methods of the other kind in a study's hybrids; True (final): nothing may follow it
    hybrid: ClassVar[bool] = True
    final: ClassVar[bool] = False
    # True when the result depends on the seed (random choices); otherwise the seed must not matter.
    random: ClassVar[bool] = False
    # True when each linear's compressed weight stands alone: the method changes no norm and no shape, so a
    # dynamic study can give every linear layer its own level (--granularity linear).
    separable: ClassVar[bool] = True

    def calibrates(self, params) -> bool:
        """Whether apply_ with these parameters uses the calibration samples: it gets them only then, and a
        setting that does not is measured once, not once per calibration draw."""
        return self.needs_calibration

    def check(self, model, params) -> None:
        """Raise IncompatiblePipelineError if `params` cannot apply to `model`; must be cheap (no calibration)."""

    def effect(self, model, params) -> Any:
        """What these parameters do to this model (cheap): two settings with equal effects are one candidate.
        By default every setting has its own effect."""
        return params

    def apply_(self, model, params, calib, seed: int) -> None:
        """Compress `model` in place. `calib` is a `Calibration` (or None when not needed)."""
        raise NotImplementedError

    def search_space(self, grids: dict[str, list] | None = None) -> dict[str, Spec]:
        """The declared space, with any parameter listed in `grids` replaced by those exact values."""
        space = dict(self.space)
        for key, values in (grids or {}).items():
            if key not in space:
                raise RegistryError(f"{self.name} has no parameter {key!r}; its parameters are "
                                    f"{', '.join(self.space) or 'none'}.")
            if not values:
                raise RegistryError(f"The grid for {self.name}.{key} is empty.")
            for v in values:
                self.make_params({key: v})  # type and validity checks
            space[key] = Categorical(values)
        return space

    def grid_size(self, grids: dict[str, list] | None = None) -> int:
        return math.prod(len(spec.grid()) for spec in self.search_space(grids).values())

    def grid(self, grids: dict[str, list] | None = None) -> list[Any]:
        """Every parameter combination of the search space, as `Params` instances, in a stable order."""
        combos: list[dict[str, Any]] = [{}]
        for key, spec in self.search_space(grids).items():
            combos = [{**c, key: v} for c in combos for v in spec.grid()]
        return [self.Params(**c) for c in combos]

    def make_params(self, values: dict[str, Any]):
        """Build `Params` from a dict, checking names, types, and the method's own validity rules."""
        unknown = set(values) - set(self.space)
        if unknown:
            raise IncompatiblePipelineError(
                f"{self.name} has no parameter {', '.join(sorted(unknown))}; "
                f"its parameters are {', '.join(self.space) or 'none'}.")
        for key, value in values.items():
            if not self.space[key].accepts(value):
                raise IncompatiblePipelineError(f"{self.name}: {key}={value!r} is not a valid value ({self.space[key]}).")
        try:
            return self.Params(**values)
        except (ValueError, TypeError) as exc:
            raise IncompatiblePipelineError(f"{self.name}: {exc}.") from exc


_REGISTRY: dict[str, Method] = {}
_plugins_loaded = False


def register_method(name: str):
    """Class decorator that validates a `Method` subclass and registers one instance of it under `name`."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise RegistryError(f"@register_method({name!r}) must decorate a subclass of compactmind.Method.")
        if not name.isidentifier():
            raise RegistryError(f"Method name {name!r} must be a plain identifier (letters, digits, underscores).")
        if name in _REGISTRY:
            raise RegistryError(f"A method named {name!r} is already registered.")
        if not isinstance(getattr(cls, "kind", None), Kind):
            raise RegistryError(f"Method {name!r} must declare kind = Kind.PRUNING or Kind.QUANTIZATION.")
        params_cls = getattr(cls, "Params", None)
        if params_cls is None or not dataclasses.is_dataclass(params_cls):
            raise RegistryError(f"Method {name!r} must declare its parameters as a dataclass named Params.")
        fields = [f.name for f in dataclasses.fields(params_cls)]
        space = getattr(cls, "space", None)
        if not isinstance(space, dict) or list(space) != fields:
            raise RegistryError(
                f"Method {name!r}: search space keys {list(space or {})} must equal its parameters {fields}, in order.")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return decorate


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    importlib.import_module("compactmind.methods")  # the built-in methods: loaded by name, as plugins are

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except RegistryError:
            raise
        except Exception as exc:  # a broken plugin must not hide which one it is
            raise RegistryError(f"The method plugin {ep.name!r} ({ep.value}) failed to load: {exc}.") from exc


def all_methods() -> dict[str, Method]:
    _load_plugins()
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise RegistryError(f"Unknown method {name!r}; known methods: {', '.join(sorted(methods))}.")
    return methods[name]
