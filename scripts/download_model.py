"""Download a model from the Hugging Face hub into a local folder that `compactmind run --model_path` reads.

    python scripts/download_model.py meta-llama/Llama-2-7b-hf models/Llama-2-7b-hf [--revision R] [--token T]

Only what the CLI needs is fetched (config, tokenizer, safetensors weights). Gated models (Llama-2) need a token
whose account accepted the licence: --token, or HF_TOKEN in the environment. Re-running resumes.
"""

import argparse
import sys

from compactmind.download import hub_snapshot, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo_id", help="model repository, e.g. meta-llama/Llama-2-7b-hf")
    p.add_argument("out_dir", help="local folder to write")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--token", help="access token (default: $HF_TOKEN)")
    args = p.parse_args(argv)
    folder = hub_snapshot(args.repo_id, args.out_dir, args.revision, args.token)
    yield f"{args.repo_id} -> {folder}/ (use: compactmind run --model_path {folder})"


if __name__ == "__main__":
    sys.exit(run(main))
