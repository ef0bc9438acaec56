#!/usr/bin/env python
"""Train the caption BPE (byte-level, lower-cased) on the captions in a set of shards.

  python train/train_tokenizer.py --data data/shapes --out runs/tokenizer --vocab_size 16384
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dalle_ar.cli import run_cli
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import captions
from dalle_ar.text import train_bpe


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard directory, glob or brace pattern")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    p.add_argument("--vocab_size", type=int, default=16384, help="BPE vocabulary size, at most (default: 16384, the paper's)")
    p.add_argument("--min_frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    args = p.parse_args(argv)
    skips = SkipCounter()
    tok = train_bpe(captions(args.data, skips), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = Path(args.out) / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {out}" + (f" (skipped {skips.counts})" if skips.total else ""))
    return out


if __name__ == "__main__":
    run_cli(main)
