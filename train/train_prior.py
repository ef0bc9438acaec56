#!/usr/bin/env python
"""Train the unCLIP diffusion prior (CLIP text embedding -> CLIP image embedding) on embedding shards.

  python train/precompute_clip.py --clip runs/clip/export --data data/shapes --out data/shapes_clip
  python train/train_prior.py --data data/shapes_clip --tokenizer runs/tokenizer --out runs/prior --steps 2000
Writes <out>/export (config.json + model.safetensors + tokenizer.json; EMA weights with --ema_decay, the
default) and <out>/eval.json: the cosine between sampled and true CLIP image embeddings on a fixed batch
of the training shards, at step 0, every --sample_every steps and for the export (next to the baseline
of using the text embedding itself).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dalle_ar import models
from dalle_ar.cli import parse, run_cli
from dalle_ar.config import DiffusionConfig, PriorConfig, TrainConfig, save_json
from dalle_ar.data.embeddings import embedding_dataset, read_meta
from dalle_ar.data.read import batches, infinite
from dalle_ar.engine import Trainer, rank
from dalle_ar.text import TextTokenizer
from dalle_ar.unclip.prior import DiffusionPrior


def extra_args(p):
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory) from train/train_tokenizer.py")
    p.add_argument("--eval_samples", type=int, default=64, help="captions in the fixed eval batch (default: 64)")
    p.add_argument("--eval_steps", type=int, default=16, help="DDIM steps when sampling the eval batch (default: 16)")
    p.add_argument("--dry_run", default=None, metavar="PATH", help=models.DRY_RUN_HELP)


def eval_batch(data: str, tok: TextTokenizer, n: int):
    ds = embedding_dataset(data)
    zi, zt, captions, _ = next(iter(ds.batched(n, partial=True)))
    return tok.encode(list(captions)), zt, zi


@torch.no_grad()
def prior_cosine(model: DiffusionPrior, batch, steps: int, device) -> float:
    """Mean cosine between sampled (2 candidates, the closer to the text kept) and true image embeddings."""
    text, zt, zi = (b.to(device) for b in batch)
    z = model.sample(text, zt.float(), steps=steps, candidates=2, generator=torch.Generator().manual_seed(0))
    return F.cosine_similarity(z, zi.float(), dim=-1).mean().item()


def main(argv=None):
    args, (prior_cfg, diffusion_cfg, cfg) = parse(
        __doc__, PriorConfig, DiffusionConfig, TrainConfig, extra=extra_args, argv=argv,
        defaults={DiffusionConfig: dict(target="x0"), TrainConfig: dict(ema_decay=0.999)})  # paper: predict x0
    meta = read_meta(cfg.data)
    tok = TextTokenizer.load(args.tokenizer, prior_cfg.text_len)
    prior_cfg = replace(prior_cfg, embed_dim=meta["embed_dim"], text_vocab_size=tok.vocab_size)
    prior_cfg = replace(prior_cfg, embed_scale=prior_cfg.scale)  # the number, stored in config.json
    tok_file = args.tokenizer if args.tokenizer.endswith(".json") else str(Path(args.tokenizer) / "tokenizer.json")
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = DiffusionPrior(prior_cfg, diffusion_cfg)
    export_config = models.export_config("unclip_prior", model, clip=meta["clip"], embeddings=cfg.data)
    if args.dry_run:
        return models.write_dry_run(args.dry_run, export_config, cfg.batch_size, cfg.grad_accum)
    trainer = Trainer(model, cfg, name="prior", export_config=export_config, extra_files={"tokenizer.json": tok_file})
    data = embedding_dataset(cfg.data, resampled=True, shuffle=2000, seed=cfg.seed + rank())
    stream = ((tok.encode(list(captions)), zt, zi) for zi, zt, captions, _ in
              infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False)))

    fixed = eval_batch(cfg.data, tok, args.eval_samples)
    baseline = F.cosine_similarity(fixed[1], fixed[2], dim=-1).mean().item()
    history = []

    def evaluate(tr: Trainer) -> None:
        # the weights sampling will use: the EMA average when there is one, in fp32
        shadow = DiffusionPrior(prior_cfg, diffusion_cfg).to(tr.device).eval()
        shadow.load_state_dict({k: v.float() for k, v in tr.module.state_dict().items()})
        if tr.ema is not None:
            shadow.load_state_dict(tr.ema.state_dict(), strict=False)
        history.append({"step": tr.step, "cosine": prior_cosine(shadow, fixed, args.eval_steps, tr.device)})
        tr.log({"eval/prior_cosine": history[-1]["cosine"]})
        if tr.is_main:
            print(f"prior step {tr.step}: sampled vs true image embedding cosine {history[-1]['cosine']:.4f} "
                  f"(text embedding itself: {baseline:.4f})", flush=True)

    if trainer.step == 0:
        evaluate(trainer)

    def on_step(tr: Trainer) -> None:
        if cfg.sample_every and tr.step % cfg.sample_every == 0 and tr.step < cfg.steps:
            evaluate(tr)

    def loss_fn(engine, batch, step):
        text, zt, zi = batch
        inputs, target = trainer.module.training_inputs(text, zt, zi)
        return trainer.module.loss_from_output(engine(*inputs), target)

    export = trainer.fit(stream, loss_fn, on_step=on_step, show=("cos",))
    if trainer.is_main:
        exported, _ = models.load(export, trainer.device)
        final = prior_cosine(exported, fixed, args.eval_steps, trainer.device)
        save_json(Path(cfg.out) / "eval.json", {"history": history, "export_cosine": final,
                                                "text_embedding_cosine": baseline, "eval_samples": len(fixed[0]),
                                                "eval_steps": args.eval_steps, "prior": asdict(prior_cfg)})
        print(f"prior export: sampled vs true image embedding cosine {final:.4f} (text embedding itself: {baseline:.4f})")
    return export


if __name__ == "__main__":
    run_cli(main)
