"""Download WikiText-2 (raw) and write it as train.txt, valid.txt and test.txt, which the CLI reads as a folder.

    python scripts/download_data.py data/wikitext2 [--dataset wikitext-2|wikitext-103]
    compactmind run --data_path data/wikitext2     # evaluates test.txt, calibrates on train.txt

Each split's rows are joined with "\\n\\n", as the GPTQ / SparseGPT / Wanda evaluation code does, so perplexities
are comparable with those papers. Needs `pip install datasets` (or `pip install 'compactmind[download]'`).
"""

import argparse
import sys

from compactmind.download import WIKITEXT, run, wikitext


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder to write train.txt, valid.txt, test.txt into")
    p.add_argument("--dataset", choices=sorted(WIKITEXT), default="wikitext-2")
    args = p.parse_args(argv)
    for path in wikitext(args.out_dir, args.dataset):
        yield f"wrote {path} ({path.stat().st_size:,} bytes)"
    yield f"use: compactmind run --data_path {args.out_dir}"


if __name__ == "__main__":
    sys.exit(run(main))
