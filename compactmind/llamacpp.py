"""llama.cpp's own rules for GGUF files, written from their published description (src/llama-quant.cpp,
`llama_tensor_get_type`; not its code): which tensors are quantized, the fallback type for a row width a type's
blocks cannot hold, and the per-tensor type choice of its "_M" recipes, so that a study can measure them as the
baselines a searched mix must beat.

Tensors by role (GGUF names): token_embd, output (the head; absent when tied to token_embd), and per block
attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down. Norms and other 1-D tensors stay F32.

Recipes (Llama architecture, one expert; `more_bits(i, n)`: i < n/8, or i >= 7n/8, or (i - n/8) % 3 == 2, with
integer division; i counts the layers of that tensor's role, n their number):
  Q4_K_M: Q4_K everywhere; attn_v and ffn_down Q6_K where more_bits; output Q6_K (Q8_0 when its width is not
          a multiple of the type's block).
  Q3_K_M: Q3_K everywhere; attn_v Q5_K in the first two layers, Q4_K after; ffn_down Q5_K in the first n/16
          layers, Q4_K after; attn_output Q4_K; output Q6_K as above.
  Q4_K_S: Q4_K everywhere; attn_v Q5_K in the first four layers; ffn_down Q5_K in the first n/8; output Q6_K.
A tied token_embd is the output (its rule); an untied one keeps the recipe's base type. Then every tensor whose
row width its type's blocks cannot hold takes the fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
Q3_K and Q2_K -> Q4_0, as current llama.cpp does; older releases used IQ4_NL for those two), and F16 when even
that does not fit.
"""

from __future__ import annotations

from compactmind import ggml

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
RECIPES = ("Q4_K_M", "Q3_K_M", "Q4_K_S")
HF_ROLES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def fitting(type_name: str, cols: int) -> str:
    """The type llama.cpp stores a row of `cols` weights in when `type_name` is asked for: the type itself,
    or its fallback when the type's blocks do not divide the row ("F16" when none does)."""
    name = type_name
    while name in ggml.TYPES and cols % ggml.TYPES[name].block:
        name = FALLBACK.get(name, "F16")
    return name


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def recipe_type(recipe: str, role: str, layer: int, n_layers: int, cols: int) -> str:
    """The type `recipe` gives a tensor of `role` ("output", "token_embd" untied, or a block role) in `layer`
    of `n_layers`, whose rows hold `cols` weights (the fallback applied)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown llama.cpp recipe {recipe!r}; one of {', '.join(RECIPES)}")
    base = "Q3_K" if recipe == "Q3_K_M" else "Q4_K"
    if role == "output":
        chosen = "Q8_0" if cols % ggml.TYPES[base].block else "Q6_K"
    elif role == "attn_v":
        chosen = {"Q4_K_M": "Q6_K" if more_bits(layer, n_layers) else base,
                  "Q3_K_M": "Q5_K" if layer < 2 else "Q4_K",
                  "Q4_K_S": "Q5_K" if layer < 4 else base}[recipe]
    elif role == "ffn_down":
        chosen = {"Q4_K_M": "Q6_K" if more_bits(layer, n_layers) else base,
                  "Q3_K_M": "Q5_K" if layer < n_layers // 16 else "Q4_K",
                  "Q4_K_S": "Q5_K" if layer < n_layers // 8 else base}[recipe]
    elif role == "attn_output" and recipe == "Q3_K_M":
        chosen = "Q4_K"
    else:
        chosen = base
    return fitting(chosen, cols)
