"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024; arXiv 2023).

A few input channels carry large activations, and their weights matter most. AWQ scales those weight columns up
before quantization (so they lose less to rounding) and folds the inverse scale into the operation that feeds
them, which leaves the full-precision function unchanged. Per group of linears sharing an input (q/k/v after
the attention norm, gate/up after the MLP norm, o after v when shapes allow, down after up), the scale is
s = mean|x|^alpha, normalised, with alpha picked from a grid of 20 values in [0, 1) to minimise the squared
error of the group's quantized outputs on calibration rows. Then every block linear is quantized round-to-
nearest per group. (The paper's extra weight-clipping search is not done.) Statistics come from the shared
layer-by-layer calibration loop. Embeddings, norms and the head are kept in FP16.

Parameters: `bits`, `group_size` (0: per output channel), `symmetric`.
"""

from __future__ import annotations

import torch

from compactmind.calibration import InputSample, require, sequential_
from compactmind.errors import IncompatiblePipelineError
from compactmind.methods._quant import (WeightQuantizer, awq_search_scale, cast_rest_to_fp16_, rtn_quantize,
                                        write_quantized_)
from compactmind.models import decoder_layers
from compactmind.registry import register_method
from compactmind.space import Categorical


def scaling_groups(layer) -> list[tuple[torch.nn.Module, list[str], str]]:
    """(operation feeding the inputs, linears that read them, linear whose recorded input is used)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "self_attn.q_proj")]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append((attn.v_proj, ["self_attn.o_proj"], "self_attn.o_proj"))
    groups.append((layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_proj"))
    groups.append((mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj"))
    return groups


@register_method("awq")
class AWQ(WeightQuantizer):
    needs_calibration = True

    space = {"bits": Categorical([3, 4]), "group_size": Categorical([128]), "symmetric": Categorical([False])}

    def check(self, model, params):
        layer = decoder_layers(model)[0]
        try:
            scaling_groups(layer)
        except AttributeError:
            raise IncompatiblePipelineError("awq needs Llama-style blocks (norms before q/k/v and gate/up, "
                                            "up before down).") from None

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        samples = require(calib, self.name).samples

        def solve(_i, layer, stats):
            modules = dict(layer.named_modules())
            for prev, names, source in scaling_groups(layer):
                linears = [modules[n] for n in names]
                weight = torch.cat([lin.weight for lin in linears])
                s = awq_search_scale(stats[source].x, weight, params.bits, params.group_size, params.symmetric)
                if prev.weight.dim() == 1:  # a norm: scale its output channels
                    prev.weight.div_(s.to(prev.weight.dtype))
                else:  # a linear: scale its output rows
                    prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
                for lin in linears:
                    lin.weight.mul_(s.to(lin.weight.dtype))
            for lname in stats:
                lin = modules[lname]
                write_quantized_(lin, rtn_quantize(lin.weight, params.bits, params.group_size, params.symmetric),
                                 params.bits, params.group_size, params.symmetric)

        sequential_(model, samples, lambda _n, lin: InputSample(lin), solve)
        cast_rest_to_fp16_(model)
