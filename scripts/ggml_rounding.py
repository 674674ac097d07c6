"""Why llama.cpp's perplexity of a K-quant file is higher than compactmind's: ggml's CPU kernels round activations.

llama.cpp's CPU matrix products do not multiply a quantized weight by float activations: each row of activations
is first quantized to the weight type's partner type (ggml's vec_dot_type): Q8_K (blocks of 256, one FP32 scale,
codes in [-127, 127]) for the K-quants, Q8_0 / Q8_1 (blocks of 32, one FP16 scale) for Q8_0 and the legacy types.
transformers and compactmind evaluate the dequantized weights on float activations, so they do not see that
rounding. This script evaluates a .gguf file both ways on the same windows: as loaded (dequantized weights, float
activations) and with every linear's input rounded as ggml rounds it (scale = max |x| / 127 per block, codes the
nearest integer, the scale stored in FP16 where ggml stores it so; ggml rounds half away from zero, torch half
to even). The second figure is the one to compare with
llama.cpp's (scripts/llamacpp_eval.py perplexity on the same windows).

    .venv/bin/python scripts/ggml_rounding.py FILE.gguf WINDOWS.npy   (windows: scripts/gguf_bench.py --out DIR)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

FLOAT_TYPES = {"F32", "F16", "BF16"}  # no rounding of the activations beyond the float type


def rounder(block: int, fp16_scale: bool):
    """A forward pre-hook rounding a linear's input in blocks of `block` values along its last dimension."""

    def hook(module, args):
        x = args[0]
        v = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        d = v.abs().amax(-1, keepdim=True) / 127
        q = torch.round(v / d.clamp_min(torch.finfo(d.dtype).tiny))  # an all-zero block stays zero
        stored = d.half().float() if fp16_scale else d  # codes from the FP32 scale, values from the stored one
        return ((q.clamp(-127, 127) * stored).reshape(x.shape),) + tuple(args[1:])

    return hook


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("windows")
    args = ap.parse_args()
    import gguf

    from compactmind import models
    from compactmind.evaluate import perplexity

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(args.file).tensors}
    model = models.load_model(args.file, torch.device("cpu"), torch.float32).model
    ids = torch.from_numpy(np.load(args.windows)).long()
    plain = perplexity(model, ids).perplexity
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name == "lm_head":  # a tied head is llama.cpp's token_embd
            tensor = "output.weight" if "output.weight" in types else "token_embd.weight"
        else:
            tensor = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        kind = types[tensor]
        if kind.name not in FLOAT_TYPES:
            # the activations' partner type has the weight type's block: Q8_K (256, FP32 scale) for the K-quants,
            # Q8_0 / Q8_1 (32, FP16 scale) for the others
            block = gguf.GGML_QUANT_SIZES[kind][0]
            hooks.append(module.register_forward_pre_hook(rounder(block, fp16_scale=block == 32)))
    rounded = perplexity(model, ids).perplexity
    print(f"{args.file}: float activations {plain:.4f}; activations rounded as ggml's CPU kernels do "
          f"({len(hooks)} linears) {rounded:.4f} ({rounded / plain - 1:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
