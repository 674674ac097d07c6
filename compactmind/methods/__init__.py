"""Built-in compression methods. Importing this package registers them."""

from compactmind.methods import (  # noqa: F401
    _awq,
    _cast,
    _fp8,
    _gguf,
    _gptq,
    _int8_sq,
    _l2_pruning,
    _magnitude,
    _random_pruning,
    _rtn,
    _sparsegpt,
    _wanda,
)

__all__: list[str] = []
