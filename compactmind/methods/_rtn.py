"""INT-k round-to-nearest (RTN) weight-only quantization: the baseline of the GPTQ and AWQ papers.

Every linear of the transformer blocks is quantized group by group along its input dimension: each group of
`group_size` weights of a row gets a scale (FP16) and, when asymmetric, a k-bit zero point; weights are
rounded to the nearest of 2^k levels. A group size that does not divide a layer's width leaves a shorter last
group (counted as a full group's scale). Zero weights (from an earlier pruning step) stay zero. Embeddings,
norms and the head are kept in FP16. No data is used.

Parameters: `bits` (2, 3, 4 or 8); `group_size` (32, 64, 128 ..., or 0 for one group per output channel);
`symmetric` (zero point fixed at 2^(k-1), or a stored per-group zero point).
"""

from __future__ import annotations

import torch

from compactmind.methods._quant import WeightQuantizer, cast_rest_to_fp16_, rtn_quantize, write_quantized_
from compactmind.models import block_linears
from compactmind.registry import register_method


@register_method("rtn")
class RTN(WeightQuantizer):
    summary = "k-bit round-to-nearest per group of input columns (the GPTQ/AWQ baseline)"
    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        for _, lin in block_linears(model):
            write_quantized_(lin, rtn_quantize(lin.weight, params.bits, params.group_size, params.symmetric),
                             params.bits, params.group_size, params.symmetric)
        cast_rest_to_fp16_(model)
