"""Download a model from ModelScope (modelscope.cn) into a local folder that `compactmind run --model_path` reads.

    python scripts/download_from_modelscope.py shakechen/Llama-2-7b-hf models/Llama-2-7b-hf [--revision R]

For users whose network reaches ModelScope more easily than the Hugging Face hub. Needs `pip install modelscope`
(or `pip install 'compactmind[download]'`). Only config, tokenizer and safetensors weights are fetched.
"""

import argparse
import sys

from compactmind.download import modelscope_snapshot, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_id", help="ModelScope model id, e.g. shakechen/Llama-2-7b-hf")
    p.add_argument("out_dir", help="local folder to write")
    p.add_argument("--revision", help="branch or tag (default: master)")
    args = p.parse_args(argv)
    folder = modelscope_snapshot(args.model_id, args.out_dir, args.revision)
    yield f"{args.model_id} -> {folder}/ (use: compactmind run --model_path {folder})"


if __name__ == "__main__":
    sys.exit(run(main))
