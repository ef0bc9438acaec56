#!/usr/bin/env python
"""Train the DALL-E transformer on token shards (text BPE ids + dVAE codes) through DeepSpeed.

  python train/train_dalle.py --data data/tokens --tokenizer runs/tokenizer --out runs/dalle --steps 2000
  deepspeed --num_gpus 8 train/train_dalle.py --preset paper --data 'tokens/{000000..000999}.tar' ...
  torchrun --nproc_per_node 2 train/train_dalle.py ...
Writes <out>/export (config.json + model.safetensors + tokenizer.json), checkpoints in <out>/checkpoints, and
every --sample_every steps and at the end a preview, <out>/samples/step_XXXXXXXX.png (also in wandb): 4 fixed
captions (held-out prompts in the shapes world, else the data's first captions) x 2 samples through DallePipeline,
decoded with --dvae (default: the dVAE the token shards' meta.json names). Previews leave the training random
streams alone: a run with them trains exactly like one without.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from dalle_ar import models
from dalle_ar.cli import given, parse, run_cli
from dalle_ar.config import ConfigError, DalleConfig, SampleConfig, TrainConfig
from dalle_ar.data import synthetic
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import batches, infinite, token_dataset
from dalle_ar.engine import Trainer, rank
from dalle_ar.model import DalleTransformer
from dalle_ar.pipeline import DallePipeline
from dalle_ar.report import save_grid
from dalle_ar.text import TextTokenizer, check_vocab
from dvae.config import DVAEConfig


def extra_args(p):
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory) from train/train_tokenizer.py")
    p.add_argument("--dvae", default=None, help="dVAE export that decodes the sample previews (default: the one the "
                   "token shards' meta.json names, written by train/encode.py)")
    p.add_argument("--dry_run", default=None, metavar="PATH", help=models.DRY_RUN_HELP)


def check_tokens(data: str, cfg: DalleConfig) -> dict:
    """The token shards must come from a dVAE with the grid and codebook the model expects."""
    meta_path = Path(data) / "meta.json"
    if not meta_path.exists():
        return {}
    meta = json.loads(meta_path.read_text())
    if meta["num_tokens"] != cfg.num_image_tokens or meta["grid_size"] != cfg.image_fmap_size:
        raise ConfigError(f"{meta_path}: tokens are {meta['grid_size']}x{meta['grid_size']} over {meta['num_tokens']} "
                          f"codes, model expects {cfg.image_fmap_size}x{cfg.image_fmap_size} over {cfg.num_image_tokens}; "
                          f"pass --image_fmap_size {meta['grid_size']} --num_image_tokens {meta['num_tokens']}")
    return meta


def token_batches(cfg: TrainConfig, skips: SkipCounter | None = None, model: DalleConfig | None = None):
    """The training stream: endless batches of (codes, captions, keys). Shards are resampled with a sampler
    seeded by (seed, rank, DataLoader worker), so every rank reads its own samples and the same command
    reads the same stream again (resume fast-forwards it). With `model`, samples whose codes are not its
    grid or codebook are skipped and counted (corrupt_codes)."""
    data = token_dataset(cfg.data, resampled=True, shuffle=2000, seed=cfg.seed + rank(), skips=skips,
                         grid=model and model.image_fmap_size, num_tokens=model and model.num_image_tokens)
    return infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False))


PREVIEW_CAPTIONS, PREVIEW_SAMPLES = 4, 2


def preview_captions(data: str) -> list[str]:
    """The previews' fixed captions: held-out shapes-world prompts when the data is the shapes world, else the
    first captions of the data."""
    first = next(iter(batches(token_dataset(data), PREVIEW_CAPTIONS)), None)
    texts = list(first[1]) if first else []
    if texts and all(synthetic.is_caption(t) for t in texts):
        return [c for _, c in synthetic.heldout(PREVIEW_CAPTIONS)]
    return texts


def preview_dvae(path: str | None, model: DalleConfig, cfg: TrainConfig) -> tuple[str | None, str]:
    """(the dVAE export that decodes previews, "") or (None, why previews are off)."""
    if not path:
        return None, f"no dVAE to decode them ({Path(cfg.data) / 'meta.json'} names none); pass --dvae EXPORT"
    config = Path(path) / "config.json"
    if not config.is_file():
        return None, f"the dVAE {path} has no config.json; pass --dvae EXPORT"
    dvae = DVAEConfig(**json.loads(config.read_text())["dvae"])
    if (dvae.grid_size, dvae.num_tokens) != (model.image_fmap_size, model.num_image_tokens):
        return None, (f"the dVAE {path} gives a {dvae.grid_size}x{dvae.grid_size} grid over {dvae.num_tokens} codes, "
                      f"the model {model.image_fmap_size}x{model.image_fmap_size} over {model.num_image_tokens}")
    if cfg.zero_stage == 3:
        return None, "ZeRO-3 keeps only a shard of the weights on each rank"
    return path, ""


def main(argv=None):
    args, (model_cfg, cfg) = parse(__doc__, DalleConfig, TrainConfig, extra=extra_args, argv=argv)
    skips = SkipCounter(source=cfg.data)  # bad samples by reason, and captions longer than text_len
    tok = TextTokenizer.load(args.tokenizer, model_cfg.text_len, skips=skips)
    if given(args, "text_vocab_size"):  # a vocabulary the user named must be this tokenizer's
        check_vocab(tok, model_cfg, f"{args.config or 'command line'} with --tokenizer {args.tokenizer}")
    model_cfg = replace(model_cfg, text_vocab_size=tok.vocab_size)  # otherwise the tokenizer decides
    meta = check_tokens(cfg.data, model_cfg)
    tok_file = args.tokenizer if args.tokenizer.endswith(".json") else str(Path(args.tokenizer) / "tokenizer.json")
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = DalleTransformer(model_cfg)
    export_config = models.export_config("dalle", model, dvae=meta.get("dvae"))
    if args.dry_run:
        return models.write_dry_run(args.dry_run, export_config, cfg.batch_size, cfg.grad_accum)
    dvae_path, why_not = preview_dvae(args.dvae or meta.get("dvae"), model_cfg, cfg)
    captions = preview_captions(cfg.data) if dvae_path else []
    trainer = Trainer(model, cfg, name="dalle", export_config=export_config, extra_files={"tokenizer.json": tok_file})
    stream = ((tok.encode(texts), codes.flatten(1)) for codes, texts, _ in token_batches(cfg, skips, model_cfg))
    if trainer.is_main and not dvae_path:
        print(f"dalle: sample previews are off: {why_not}", flush=True)
    pipe = None

    def on_step(t: Trainer) -> None:
        nonlocal pipe
        if not (dvae_path and captions and t.is_main and t.preview_due()):
            return
        with t.previewing() as module:  # the real sampling path, on the live weights
            if pipe is None:
                pipe = DallePipeline(module, TextTokenizer.load(tok_file, model_cfg.text_len),
                                     models.load(dvae_path, t.device, kind="dvae")[0], device=t.device,
                                     name="dalle")
            out = pipe(captions, SampleConfig(num_candidates=PREVIEW_SAMPLES, top_k_rerank=1, seed=0))
        path = save_grid(out["images"].flatten(0, 1), t.out / "samples" / f"step_{t.step:08d}.png",
                         nrow=PREVIEW_SAMPLES, row_labels=captions)
        t.log_image("samples", path)

    def loss_fn(engine, batch, step):
        text, codes = batch
        inputs, target = trainer.module.training_inputs(text, codes)  # caption dropout happens here
        return trainer.module.loss_from_output(engine(*inputs), target)

    return trainer.fit(stream, loss_fn, on_step=on_step, skips=skips)


if __name__ == "__main__":
    run_cli(main)
