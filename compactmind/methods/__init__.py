"""Built-in compression methods. Importing this package registers them."""

from compactmind.methods import _fp16, _int8_sq, _l2_pruning, _random_pruning  # noqa: F401

__all__: list[str] = []
