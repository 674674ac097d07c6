"""INT8-SQ: SmoothQuant W8A8 (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023).

Activation outliers concentrate in a few channels, which per-token activation quantization handles badly.
SmoothQuant migrates that difficulty into the weights with a mathematically equivalent per-input-channel
scaling: for the linears fed by a normalisation layer (q/k/v after the attention norm, gate/up after the MLP
norm) it computes s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) from calibration activation maxima and the
weight columns' maxima, divides the norm's weight by s and multiplies the weight columns by s. Then every
linear of the blocks runs W8A8, simulated: weights quantized per output channel (symmetric INT8, one FP16
scale per row) and activations quantized per token, dynamically, at every forward. Weights outside the
blocks (embeddings, norms, head) are kept in FP16, as in the paper's setting.

Parameters: `alpha`, the migration strength (larger moves more of the activation range into the weights; the
paper uses 0.5 for most models and up to 0.8-0.85 for some); `smooth`, False for naive W8A8 (the same
quantization with no smoothing, the paper's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.calibration import output_absmax, require
from compactmind.errors import IncompatiblePipelineError
from compactmind.formats import record
from compactmind.methods._quant import cast_rest_to_fp16_, quantize_per_row, write_quantized_
from compactmind.models import block_linears, decoder_layers
from compactmind.packed import per_token_int8
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical, Float


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), guarded against zeros."""
    act = act_max.float().clamp(min=1e-5)
    w = weight_max.float().clamp(min=1e-5)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _groups(layer):
    """(norm, linears it feeds) pairs that can be smoothed in a Llama-style block."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    pairs = []
    if attn is not None and hasattr(layer, "input_layernorm"):
        pairs.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
    if mlp is not None and hasattr(layer, "post_attention_layernorm"):
        pairs.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    return pairs


@register_method("int8_sq")
class Int8SmoothQuant(Method):
    summary = "W8A8 with activation outliers migrated into the weights (Xiao et al. 2023)"
    kind = Kind.QUANTIZATION
    needs_calibration = True
    separable = False  # scales norms and the linears they feed together

    @dataclass(frozen=True)
    class Params:
        alpha: float = 0.5
        smooth: bool = True

        def __post_init__(self):
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    space = {"alpha": Float(0.5, 0.8, step=0.15), "smooth": Categorical([True])}

    def check(self, model, params):
        layer = decoder_layers(model)[0]
        if len(_groups(layer)) != 2 or not hasattr(layer.input_layernorm, "weight"):
            raise IncompatiblePipelineError("int8_sq needs Llama-style blocks (input_layernorm before q/k/v, "
                                            "post_attention_layernorm before gate/up).")

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        if params.smooth:
            smooth_(model, params.alpha, require(calib, self.name))
        for _, linear in block_linears(model):
            write_quantized_(linear, quantize_per_row(linear.weight, 8), 8, None, symmetric=True)
            linear.register_forward_pre_hook(per_token_int8)
            record(linear, "weight", act_quant="int8")
        cast_rest_to_fp16_(model)


def smooth_(model, alpha: float, calib) -> None:
    """Migrate activation outliers into the weights: norm /= s, weight columns *= s (exact before quantizing)."""
    layers = decoder_layers(model)
    norms = {f"{i}.{j}": norm for i, layer in enumerate(layers) for j, (norm, _) in enumerate(_groups(layer))}
    act_max = calib.stats("norm_output_absmax", lambda: output_absmax(model, calib.samples, norms))
    for i, layer in enumerate(layers):
        for j, (norm, linears) in enumerate(_groups(layer)):
            w_max = torch.cat([lin.weight.abs() for lin in linears]).amax(0).float()
            s = smoothing_scales(act_max[f"{i}.{j}"].to(w_max.device), w_max, alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype))
