"""compactmind: automatic search over LLM compression pipelines (pruning, quantization, hybrids) on Optuna."""

from compactmind.errors import CompactMindError
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical, Float, Int

__version__ = "0.1.0"
__all__ = ["Categorical", "CompactMindError", "Float", "Int", "Kind", "Method", "register_method"]
