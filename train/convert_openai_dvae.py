#!/usr/bin/env python
"""Convert OpenAI's published dVAE (encoder.pkl + decoder.pkl) to a dalle-ar export (config.json + model.safetensors).

  python train/convert_openai_dvae.py --encoder encoder.pkl --decoder decoder.pkl --out runs/openai_dvae
Download the two files beforehand (https://cdn.openai.com/dall-e/encoder.pkl and .../decoder.pkl); nothing is
fetched here. The pickles are read with a restricted unpickler (see dvae/openai.py): no code from them runs and
the `dall_e` package is not needed. The export then works everywhere a trained dVAE does (encode.py, sampling).
"""

from __future__ import annotations

import argparse
import logging
import torch

from dalle_ar import models
from dalle_ar.checkpoint import save_pretrained
from dalle_ar.cli import run_cli
from dvae.openai import import_openai_dvae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="OpenAI's encoder.pkl")
    p.add_argument("--decoder", required=True, help="OpenAI's decoder.pkl")
    p.add_argument("--out", required=True, help="output export directory")
    p.add_argument("--image_size", type=int, default=256, help="image size the export is used at (default: 256, "
                   "as OpenAI's model was trained; any multiple of 8 works)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, provenance = import_openai_dvae(args.encoder, args.decoder, args.image_size)
    with torch.no_grad():  # a quick self-check: decode(encode(x)) runs and has the right shape
        x = torch.rand(1, 3, args.image_size, args.image_size)
        assert model.decode(model.encode(x)).shape == x.shape
    config = models.export_config("dvae", model, source={"format": "openai-dall_e", **provenance})
    out = save_pretrained(model, args.out, config)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted OpenAI dVAE ({n / 1e6:.1f}M parameters, {model.config.num_tokens} codes, "
          f"{model.config.grid_size}x{model.config.grid_size} grid at {args.image_size}px) -> {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
