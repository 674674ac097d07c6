"""Why llama.cpp's perplexity of a K-quant file is higher than transformers': ggml's CPU kernels round activations.

llama.cpp's CPU matrix products do not multiply a quantized weight by float activations: each row of activations
is first quantized to the weight type's partner type (ggml's vec_dot_type): Q8_K (blocks of 256, one FP32 scale,
codes in [-127, 127]) for the K-quants, Q8_0 / Q8_1 (blocks of 32, one FP16 scale) for Q8_0 and the legacy types.
transformers (and a `gguf` trial with activations="float") evaluates the dequantized weights on float
activations, so it does not see that rounding. This script evaluates a .gguf file both ways on the same windows:
as loaded (dequantized weights, float activations) and with every linear's input rounded as ggml rounds it
(compactmind.ggml.round_activations, what a `gguf` trial with activations="ggml" measures). The second figure is
the one to compare with llama.cpp's (scripts/llamacpp_eval.py perplexity on the same windows).

    .venv/bin/python scripts/ggml_rounding.py FILE.gguf WINDOWS.npy   (windows: scripts/gguf_bench.py --out DIR)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("windows")
    args = ap.parse_args()
    from compactmind import models
    from compactmind.deploy.gguf import round_as_llamacpp_
    from compactmind.evaluate import perplexity

    model = models.load_model(args.file, torch.device("cpu"), torch.float32).model
    ids = torch.from_numpy(np.load(args.windows)).long()
    plain = perplexity(model, ids).perplexity
    hooked = round_as_llamacpp_(model, Path(args.file))
    rounded = perplexity(model, ids).perplexity
    print(f"{args.file}: float activations {plain:.4f}; activations rounded as ggml's CPU kernels do "
          f"({hooked} linears) {rounded:.4f} ({rounded / plain - 1:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
