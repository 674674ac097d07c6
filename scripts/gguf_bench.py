"""GGUF against llama.cpp's own recipes, measured by llama.cpp itself.

1. The dense model (SmolLM2 dequantized from its Q4_1 file) is written as a GGUF file (F16 where exact, else F32),
   and llama.cpp's quantizer (llama-cpp-python's llama_model_quantize) makes its Q4_K_M and Q3_K_M of it, with
   and without an importance matrix (the mean squared activation of each linear's inputs on the calibration
   samples, computed here on the dense model as llama.cpp's imatrix tool does, and passed as it passes one).
2. At each recipe's tensor bytes, a dynamic compactmind study searches a per-tensor mix of GGUF types (levels
   Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K with the imatrix solver, units every linear and the embedding; llama.cpp's
   fallback where a width does not fit a K-quant), selecting on the perplexity of the study's selection windows of
   validation text (--fitness kl: on KL divergence to the dense model), and exports its best as a .gguf file; the
   study also measures llama.cpp's recipes and the uniform type made by our quantizer. With --activations ggml
   (the default) every trial is evaluated as llama.cpp's CPU kernels compute it (each linear's input rounded to
   8 bits, gguf(activations=ggml)), so the trial's recorded figure is the one llama.cpp is compared with.
3. Every file's perplexity is measured by llama.cpp on the same test windows (compactmind's protocol: each
   window on its own, every position after the first), and compared with the dense file's: the excess (PPL -
   dense PPL) of our mix against that of llama.cpp's recipe with an importance matrix; and, for each exported
   trial, llama.cpp's figure against the test perplexity the trial recorded.
4. Our round-to-nearest fit against llama.cpp's quantizer (ggml_quantize_chunk, no importance matrix) on every
   ffn_down tensor (the tensors SmolLM2 stores in K-quants): the squared error of each K-quant.

llama-cpp-python is installed into its own virtual environment (--llama_venv; it compiles llama.cpp for this CPU,
about 200 s on 2 cores) and used from scripts/llamacpp_eval.py.

    .venv/bin/python scripts/gguf_bench.py --out /tmp/gguf-bench [--minutes 30] [--fitness ppl] [--activations ggml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RECIPES = ("Q4_K_M", "Q3_K_M")
LEVELS = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def llama_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "llama-cpp-python", "numpy"], check=True)
    return python


def tool(python: Path, *args) -> str:
    done = subprocess.run([str(python), str(HERE / "llamacpp_eval.py"), *map(str, args)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"llamacpp_eval.py {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout


def tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def imatrix(model, samples: torch.Tensor) -> dict[str, np.ndarray]:
    """Per GGUF weight name, the mean squared activation of each input column on the dense model."""
    from compactmind.calibration import InputNorms, run_body
    from compactmind.deploy.gguf import gguf_names
    from compactmind.models import block_linears

    name_of = gguf_names(model)
    acc = {name: InputNorms(lin) for name, lin in block_linears(model)}
    handles = [lin.register_forward_hook(lambda m, a, o, s=acc[name]: s.add_batch(a[0], o))
               for name, lin in block_linears(model)]
    try:
        run_body(model, samples)
    finally:
        for h in handles:
            h.remove()
    return {name_of(f"{name}.weight"): a.sq.numpy() for name, a in acc.items()}


def quantizer_errors(python: Path, model, out: Path) -> list[str]:
    """Our rtn fit against llama.cpp's quantizer on every ffn_down tensor, per K-quant: summed squared error."""
    import gguf

    from compactmind import ggml

    weights = {f"blk.{i}.ffn_down": layer.mlp.down_proj.weight.detach().float().numpy()
               for i, layer in enumerate(model.model.layers)}
    np.savez(out / "ffn_down.npz", **weights)
    lines = [f"{'type':<6}{'llama.cpp error':>16}{'ours (rtn)':>12}{'ours / llama.cpp':>18}"]
    for name in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"):
        tool(python, "quantize_rows", out / "ffn_down.npz", name, out / f"ffn_down_{name}.npz")
        theirs_bytes = np.load(out / f"ffn_down_{name}.npz")
        kind = gguf.GGMLQuantizationType[name]
        theirs = ours = 0.0
        for key, w in weights.items():
            theirs += float(((gguf.quants.dequantize(theirs_bytes[key], kind) - w) ** 2).sum())
            _, values = ggml.quantize(torch.from_numpy(w), name)
            ours += float(((values.numpy() - w) ** 2).sum())
        lines.append(f"{name:<6}{theirs:>16.4f}{ours:>12.4f}{ours / theirs:>18.3f}")
    return lines


def study(out: Path, target_ratio: float, name: str, minutes: float, storage: str, fitness: str) -> dict:
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--dynamic", "--methods", "gguf", "--granularity",
           "linear", "--embedding_units", "--seq_len", "512", "--max_eval_windows", "16", "--data_samples", "32",
           "--fitness", fitness, "--target_ratio", repr(round(target_ratio, 6)),
           "--storage", storage, "--study_name", name, "--output_dir", str(out / name), "--levels_dir",
           str(out / "levels"), "--timeout", str(60 * minutes), "--n_trials", "100000", "--study",
           str(out / "levels.toml")]
    subprocess.run(cmd, check=True)
    return json.loads((out / name / "report.json").read_text())


def export(storage: str, name: str, trial: int, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "compactmind", "-q", "export", "--study_name", name, "--storage", storage,
                    "--trial", str(trial), "--format", "gguf", "--out", str(folder), "--verify"], check=True)
    return folder / "model.gguf"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/gguf-bench")
    ap.add_argument("--llama_venv", default=str(Path.home() / ".cache" / "compactmind" / "llama-venv"))
    ap.add_argument("--minutes", type=float, default=30.0, help="search time per target")
    ap.add_argument("--fitness", default="ppl", choices=("ppl", "kl"),
                    help="what the search selects on (selection windows of validation text): perplexity, what the "
                         "goal is measured in, or KL divergence to the dense model")
    ap.add_argument("--targets", default=",".join(RECIPES), help="the recipes whose sizes are searched at")
    ap.add_argument("--activations", default="ggml", choices=("ggml", "float"),
                    help="what the trials compute: llama.cpp's CPU kernels' 8-bit rounding of each linear's input, "
                         "or float activations (transformers' figure)")
    ap.add_argument("--skip_search", action="store_true", help="only llama.cpp's recipes and the quantizer errors")
    args = ap.parse_args()
    if not set(args.targets.split(",")) <= set(RECIPES):
        ap.error(f"--targets takes recipes among {', '.join(RECIPES)}, not {args.targets!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    python = llama_python(Path(args.llama_venv))
    print(f"llama-cpp-python ready ({time.perf_counter() - started:.0f} s)", flush=True)

    from compactmind import data as D
    from compactmind import models
    from compactmind.deploy import gguf as gguf_format
    from compactmind.footprint import Reference

    loaded = models.load_model(None, torch.device("cpu"), torch.float32)
    data = D.prepare(loaded.tokenizer, D.resolve_sources(None, None), 512, 32, 16, seed=0)
    np.save(out / "windows.npy", data.windows.numpy())
    np.savez(out / "imatrix.npz", **imatrix(loaded.model, data.calib))
    dense = out / "dense"
    if not (dense / gguf_format.FILE).exists():
        gguf_format.write(loaded.model, loaded.tokenizer, dense, {"model": {"source_gguf": loaded.source_info["path"]}})
    reference = Reference.of(loaded.model)  # the study's own count: every weight once, a tied head included
    rows = []

    def measure(label: str, path: Path, trial: float | None = None) -> dict:
        """llama.cpp's perplexity of a file (and, for an exported trial, against the test figure it recorded)."""
        ppl = json.loads(tool(python, "perplexity", path, out / "windows.npy"))["perplexity"]
        stored = tensor_bytes(path)
        row = {"label": label, "file_mb": path.stat().st_size / 1e6, "tensor_bytes": stored,
               "bpw": 8 * stored / reference.n_weights, "perplexity": ppl, "trial_perplexity": trial}
        rows.append(row)
        note = f"the trial recorded {trial:.3f}: llama.cpp {ppl / trial - 1:+.2%}" if trial else ""
        print(f"{label:<40} {row['file_mb']:>8.2f} MB {row['bpw']:>6.3f} bpw  ppl {ppl:.3f}  {note}", flush=True)
        return row

    base = measure("dense (F16/F32 GGUF of the dequantized model)", dense / gguf_format.FILE)
    made = {}
    for recipe in RECIPES:
        for with_imatrix in (False, True):
            path = out / f"llama.cpp-{recipe}{'-imatrix' if with_imatrix else ''}.gguf"
            tool(python, "quantize", dense / gguf_format.FILE, path, recipe,
                 *(["--imatrix", out / "imatrix.npz"] if with_imatrix else []))
            made[(recipe, with_imatrix)] = measure(f"llama.cpp {recipe}{' + imatrix' if with_imatrix else ''}", path)
    for line in quantizer_errors(python, loaded.model, out):
        print(line)
    if not args.skip_search:
        (out / "levels.toml").write_text("[run]\n[grids.gguf]\ntype = [" + ", ".join(f'"{t}"' for t in LEVELS) +
                                         ']\nsolver = ["imatrix"]\nembeddings = ["Q8_0"]\n'
                                         f'activations = ["{args.activations}"]\n')
        storage = f"sqlite:///{out}/gguf.db"
        for recipe in args.targets.split(","):
            target = 1 - made[(recipe, True)]["tensor_bytes"] / reference.dense_bytes
            name = f"at-{recipe}-{args.fitness}" + ("-ggml" if args.activations == "ggml" else "")
            report = study(out, target, name, args.minutes, storage, args.fitness)
            best = report["best"]
            path = export(storage, name, best["number"], out / f"ours-{name}")
            ours = measure(f"compactmind search at {recipe}'s size", path, best.get("perplexity"))
            for t in report["trials"]:
                if t.get("baseline") == f"llama.cpp {recipe}" and t["state"] == "COMPLETE":
                    mine = export(storage, name, t["number"], out / f"recipe-{name}")
                    measure(f"llama.cpp {recipe}'s mix, our imatrix fit", mine, t.get("perplexity"))
            theirs = made[(recipe, True)]
            ratio = (ours["perplexity"] - base["perplexity"]) / (theirs["perplexity"] - base["perplexity"])
            print(f"excess over dense at {recipe}: ours {ours['perplexity'] - base['perplexity']:.3f}, llama.cpp + "
                  f"imatrix {theirs['perplexity'] - base['perplexity']:.3f}: {ratio:.2f}x", flush=True)
    (out / "gguf_bench.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
