"""GGUF types: llama.cpp's block quantization (ggml.py; llama.cpp, ggml-org/llama.cpp) as a method, so a study
searches the types llama.cpp runs and `export --format gguf` writes exactly the evaluated weights.

Every block linear is stored in `type` (or, where its row width is not a multiple of the type's blocks, in
llama.cpp's fallback type: Q4_K -> Q5_0 on SmolLM2's 576-wide rows, see llamacpp.py), and the token embedding
(with the head, tied or not) in `embeddings`; norms stay F32, as in llama.cpp's files. A weight is evaluated as
its stored blocks dequantize (gguf-py's dequantizer gives the same floats bit for bit), and counts exactly the
type's bytes per block (Q4_K: 144 bytes per 256 weights).

`solver` chooses the stored blocks:
  rtn      each block's scales by a search minimising the squared error (ggml.fit), codes to the nearest value;
  imatrix  the same error weighed per input column by the mean squared calibration activation (what
           llama.cpp's importance matrix collects), from the shared layer-by-layer calibration loop;
  gptq     GPTQ's error compensation (Frantar et al., 2022) onto the type's grid: columns by decreasing H_jj,
           each block's scales fitted (weighed by diag H) when the loop first reaches it, from the weights as
           the error feedback has left them.
The embeddings and the head are fitted by rtn whatever the solver (llama.cpp's importance matrix has no
activations for the token embedding either).

`activations` says which program's figure the trial measures:
  float    the dequantized weights on float activations: what transformers computes from the exported file;
  ggml     every linear's input rounded to 8 bits as llama.cpp's CPU kernels round it before the product (Q8_K
           blocks of 256 for a K-quant weight, Q8_0 blocks of 32 otherwise; ggml.round_activations): what
           llama.cpp computes. On SmolLM2 llama.cpp's perplexity of a file is ~0.7% above transformers'.
The stored weights, and the file, are the same either way.

Parameters: `type` (a ggml type), `solver`, `embeddings` (the token embedding's and head's type), `activations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactmind import ggml
from compactmind.calibration import Hessian, InputNorms, require, sequential_
from compactmind.errors import IncompatiblePipelineError
from compactmind.formats import entry, is_sparse, record
from compactmind.llamacpp import fitting
from compactmind.methods._quant import gptq_solve
from compactmind.models import block_linears
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical

SOLVERS = ("rtn", "imatrix", "gptq")
ACTIVATIONS = ("float", "ggml")


def store_(module: nn.Module, param: str, type_name: str, importance: torch.Tensor | None = None,
           hessian: torch.Tensor | None = None, activations: str = "float") -> None:
    """Store module.<param> in a ggml type (its fallback where the type does not fit): the weight becomes its
    blocks' values and the ledger records the type, the grid and whether its inputs are rounded as ggml's."""
    w = getattr(module, param)
    name = fitting(type_name, w.shape[1])
    if name == "F16":
        raise IncompatiblePipelineError(f"No ggml type holds rows of {w.shape[1]} weights (not a multiple of 32).")
    if hessian is not None:
        grid, values = _gptq_onto(w, hessian, name)
    else:
        grid = ggml.fit(w.float(), name, importance)
        values = ggml.quantize_columns(grid, w.float(), 0)[1]
    w.data.copy_(values.to(w.dtype))
    record(module, param, ggml=name, grid=grid, qparams=None,
           act_quant=ggml.ACT_QUANT if activations == "ggml" else None)


def _gptq_onto(w: torch.Tensor, H: torch.Tensor, type_name: str) -> tuple["ggml.Grid", torch.Tensor]:
    block = ggml.TYPES[type_name].block
    importance = torch.diag(H).clamp(min=0)
    grids: dict[int, ggml.Grid] = {}

    def quantize_column(j: int, col: torch.Tensor, current) -> torch.Tensor:
        b = j // block
        if b not in grids:
            cols = torch.arange(b * block, (b + 1) * block)
            grids[b] = ggml.fit(current(cols), type_name, importance[cols])
        return ggml.quantize_columns(grids[b], col.unsqueeze(1), j - b * block)[1].squeeze(1)

    values = gptq_solve(w, H, quantize_column, act_order=True)
    return ggml.joined([grids[b] for b in range(w.shape[1] // block)]), values


@register_method("gguf")
class GGUF(Method):
    summary = "llama.cpp's GGUF block types (Q8_0 ... Q2_K), fitted by rtn, imatrix or GPTQ; exports as .gguf"
    kind = Kind.QUANTIZATION
    needs_calibration = True  # imatrix and gptq
    hybrid = False  # a GGUF file stores neither sparsity nor removed channels
    final = True  # its blocks hold the weights: nothing may change them after it

    @dataclass(frozen=True)
    class Params:
        type: str = "Q4_K"
        solver: str = "rtn"
        embeddings: str = "Q8_0"
        activations: str = "float"

        def __post_init__(self):
            for value, allowed in ((self.type, ggml.TYPES), (self.embeddings, ggml.TYPES), (self.solver, SOLVERS),
                                   (self.activations, ACTIVATIONS)):
                if value not in allowed:
                    raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")

    space = {"type": Categorical(list(ggml.TYPES), searched=["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]),
             "solver": Categorical(SOLVERS, searched=["rtn"]),
             "embeddings": Categorical(list(ggml.TYPES), searched=["Q8_0"]),
             "activations": Categorical(ACTIVATIONS, searched=["float"])}

    def calibrates(self, params) -> bool:
        return params.solver != "rtn"

    def check(self, model, params):
        for name, lin in block_linears(model):
            if is_sparse(lin):
                raise IncompatiblePipelineError(f"gguf cannot follow pruning: {name} is sparse, and a GGUF block "
                                                "type stores every weight.")
            if fitting(params.type, lin.in_features) == "F16":
                raise IncompatiblePipelineError(f"No ggml type holds {name}'s rows of {lin.in_features} weights.")

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        act = params.activations
        if params.solver == "rtn":
            for _, lin in block_linears(model):
                store_(lin, "weight", params.type, activations=act)
        else:
            calib = require(calib, f"gguf(solver={params.solver})")
            statistic = InputNorms if params.solver == "imatrix" else Hessian

            def solve(_i, layer, stats, _samples):
                modules = dict(layer.named_modules())
                for lname, acc in stats.items():
                    if params.solver == "imatrix":
                        store_(modules[lname], "weight", params.type, importance=acc.sq, activations=act)
                    else:
                        store_(modules[lname], "weight", params.type, hessian=acc.H, activations=act)

            sequential_(model, calib, lambda _n, lin: statistic(lin), solve, true_sequential=params.solver == "gptq")
        embeddings_(model, params.embeddings, act)
        round_inputs_(model)


def embeddings_(model: nn.Module, type_name: str, activations: str = "float") -> None:
    """The token embedding and the head (once when tied) in `type_name`, by rtn."""
    seen = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and id(module.weight) not in seen:
            seen.add(id(module.weight))
            store_(module, "weight", type_name, activations=activations)


class ActivationRounding:
    """Forward pre-hook of a linear: its input rounded as ggml rounds it for the type of `source`'s weight (the
    linear itself, or the token embedding a tied head shares), read from the ledger at every call, so the hook
    follows a dynamic study's level swaps; a weight not recorded with act_quant="ggml" leaves its input alone."""

    def __init__(self, source: nn.Module):
        self.source = source

    def __call__(self, _module, args):
        e = entry(self.source)
        if e.act_quant != ggml.ACT_QUANT or e.format.ggml is None:
            return None
        return (ggml.round_activations(args[0], e.format.ggml),) + tuple(args[1:])


def round_inputs_(model: nn.Module) -> int:
    """Give every linear whose weight (a tied head: the token embedding's) is recorded with act_quant="ggml" the
    rounding hook, once; returns how many linears were given one now."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    added = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        source = embedding if tied and module is head else module
        hooked = any(isinstance(h, ActivationRounding) for h in module._forward_pre_hooks.values())
        if not hooked and entry(source).act_quant == ggml.ACT_QUANT:
            module.register_forward_pre_hook(ActivationRounding(source))
            added += 1
    return added
