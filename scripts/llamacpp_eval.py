"""llama.cpp's side of scripts/gguf_bench.py, run by the Python of a virtual environment that holds
llama-cpp-python (PyPI: it compiles llama.cpp for this CPU); compactmind is not imported here.

    python scripts/llamacpp_eval.py quantize IN.gguf OUT.gguf Q4_K_M [--imatrix imatrix.npz]
    python scripts/llamacpp_eval.py perplexity MODEL.gguf windows.npy        -> prints one JSON line
    python scripts/llamacpp_eval.py quantize_rows tensors.npz TYPE out.npz   -> llama.cpp's own bytes per tensor

perplexity: each window of token ids is scored on its own, every position after the first (compactmind's
protocol: no BOS added, no context carried over), from llama.cpp's logits on the CPU.
imatrix: per weight name (GGUF names), the mean squared activation of each input column, passed to
llama_model_quantize as llama.cpp's quantize tool passes its importance matrix.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys

import numpy as np


def quantize(src: str, dst: str, ftype: str, imatrix: str | None = None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    keep = []
    if imatrix:
        data = np.load(imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()
        for i, name in enumerate(data.files):
            values = np.ascontiguousarray(data[name], dtype=np.float32)
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


def perplexity(model: str, windows: str) -> dict:
    from llama_cpp import Llama

    ids = np.load(windows)
    n = ids.shape[1]
    llm = Llama(model_path=model, n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, verbose=False, n_threads=2)
    total, count = 0.0, 0
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:n], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= float(sum(logp[i, row[i + 1]] for i in range(n - 1)))
        count += n - 1
    return {"perplexity": math.exp(total / count), "windows": int(ids.shape[0]), "tokens": count}


def quantize_rows(tensors: str, type_name: str, out: str) -> None:
    """llama.cpp's own quantizer (ggml_quantize_chunk, without an importance matrix) on each tensor's rows."""
    import llama_cpp
    from llama_cpp import llama_cpp as lib

    ggml = ctypes.CDLL(str(next(p for p in lib._base_path.glob("libggml-base*"))))  # the bundled ggml
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_row_size.restype = ctypes.c_size_t
    ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    kind = getattr(llama_cpp, f"GGML_TYPE_{type_name}")
    data, result = np.load(tensors), {}
    for name in data.files:
        w = np.ascontiguousarray(data[name], dtype=np.float32)
        rows, cols = w.shape
        buf = np.zeros(rows * ggml.ggml_row_size(kind, cols), dtype=np.uint8)
        ggml.ggml_quantize_chunk(kind, w.ctypes.data, buf.ctypes.data, 0, rows, cols, None)
        result[name] = buf.reshape(rows, -1)
    np.savez(out, **result)


def main() -> int:
    cmd, *rest = sys.argv[1:]
    if cmd == "quantize":
        imatrix = rest[rest.index("--imatrix") + 1] if "--imatrix" in rest else None
        quantize(rest[0], rest[1], rest[2], imatrix)
    elif cmd == "perplexity":
        print(json.dumps(perplexity(rest[0], rest[1])))
    elif cmd == "quantize_rows":
        quantize_rows(rest[0], rest[1], rest[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
