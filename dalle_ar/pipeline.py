"""DALL-E end to end: caption -> BPE tokens -> the transformer samples image codes -> the dVAE decodes them, and the
candidates' scores (CLIP cosine, the transformer's own likelihood) for reranking (DALL-E sections 2.3 and 2.6).
The AR twin of `dalle_ar.unclip.pipeline.UnclipPipeline`; sample/generate.py, sample/compare.py and
bench/rerank_accuracy.py call it.

    pipe = DallePipeline.load("runs/dalle/export", clip="runs/clip/export", device="cuda")
    out = pipe(["a red circle"], SampleConfig(num_candidates=16, seed=0))   # out["images"]: (P, N, 3, H, W) in [0, 1]

Sampling draws from one `torch.Generator` seeded with `SampleConfig.seed` on the pipeline's device: the same seed,
batch size and device give the same images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dalle_ar import models
from dalle_ar.clip import ClipScorer
from dalle_ar.config import ConfigError, SampleConfig
from dalle_ar.sampling import border_mask, box_mask, generate_codes, log_likelihood, prime_mask
from dalle_ar.text import TextTokenizer, check_vocab


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [0, 1] (centre-cropped to a square, resized)."""
    from PIL import Image, ImageOps

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prime/inpaint image not found; pass --prime-image with an existing PNG/JPEG")
    try:
        image = ImageOps.fit(Image.open(p).convert("RGB"), (size, size), Image.BICUBIC)
    except OSError as e:  # PIL.UnidentifiedImageError (not an image), a truncated file
        raise ConfigError(f"{p.name}: not an image that can be read ({e.__class__.__name__}); pass a PNG or JPEG") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


class DallePipeline:
    def __init__(self, transformer, tokenizer: TextTokenizer, dvae, clip: ClipScorer | None = None,
                 device: str | torch.device = "cpu", name: str = "the transformer"):
        self.transformer, self.tokenizer, self.dvae, self.clip = transformer, tokenizer, dvae, clip
        self.device = device
        self.name = name  # the export directory, for messages

    @classmethod
    def load(cls, export_dir: str | Path, dvae: str | Path | None = None, clip: str | ClipScorer | None = None,
             device: str | torch.device = "cpu") -> "DallePipeline":
        """The transformer export with its tokenizer (checked against the model's vocabulary), its dVAE (default:
        the one its config.json names, the one its tokens were encoded with) and an optional CLIP for scores (an
        export directory, ARCH:/local/weights, or a loaded ClipScorer). On CUDA the transformer runs in bf16."""
        model, config = models.load(export_dir, device, kind="dalle")
        if str(device).startswith("cuda"):
            model = model.to(torch.bfloat16)  # sampling is memory-bound: half the bytes per step
        tok_file = str(Path(export_dir) / "tokenizer.json")
        tok = TextTokenizer.load(tok_file, model.config.text_len)
        check_vocab(tok, model.config, tok_file)
        dvae = dvae or config.get("dvae")
        if not dvae:
            raise ConfigError(f"{export_dir}/config.json names no dVAE; pass --dvae <dvae export directory>")
        dvae_model = models.load(dvae, device, kind="dvae")[0]
        if isinstance(clip, (str, Path)):
            clip = ClipScorer.load(str(clip), device)
        return cls(model, tok, dvae_model, clip, device, str(export_dir))

    @property
    def grid_size(self) -> int:
        return self.transformer.config.image_fmap_size

    def check_prompt(self, prompt: str) -> None:
        """ConfigError for a caption the transformer cannot read whole (empty, or over its text slots); sampling
        itself truncates an overlong caption (and counts it)."""
        self.tokenizer.check_fits(prompt)

    # -- priming and inpainting ---------------------------------------------------------------------------
    def known_region(self, cfg: SampleConfig, image: str | Path | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(codes (1, side, side), known mask (side, side)) of `image` under cfg.prime_rows / inpaint_box /
        inpaint_border, or (None, None) without an image. The model is autoregressive: a regenerated cell sees
        only the known cells before it in raster order."""
        modes = [m for m, on in (("--prime-rows", cfg.prime_rows), ("--inpaint-box", cfg.inpaint_box),
                                 ("--inpaint-border", cfg.inpaint_border)) if on]
        if len(modes) > 1:
            raise ConfigError(f"{' and '.join(modes)}: pick one of priming, a box or a border")
        if not image:
            if modes:
                raise ConfigError(f"{modes[0]} needs an input image: pass --prime-image x.png")
            return None, None
        if not modes:
            raise ConfigError("--prime-image needs --prime-rows R, --inpaint-box x0,y0,x1,y1 or --inpaint-border N")
        side = self.grid_size
        try:
            if cfg.prime_rows:
                known = prime_mask(side, cfg.prime_rows)
            elif cfg.inpaint_box:
                known = box_mask(side, tuple(float(v) if "." in v else int(v) for v in cfg.inpaint_box.split(",")))
            else:
                known = border_mask(side, cfg.inpaint_border)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        codes = self.dvae.encode(load_image(image, self.dvae.config.image_size).to(self.device))
        if codes.shape[-1] != side:
            raise ConfigError(f"{image}: the dVAE gives a {codes.shape[-1]}-wide grid, the transformer expects "
                              f"{side}; pass the --dvae the transformer was trained with")
        return codes, known

    # -- the stages ---------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], num_candidates: int) -> torch.Tensor:
        """Captions -> token rows (P * N, text_len), each prompt repeated for its N candidates."""
        return self.tokenizer.encode(list(prompts)).to(self.device).repeat_interleave(num_candidates, dim=0)

    def sample_chunks(self, text: torch.Tensor, rows: int, generator: torch.Generator, *, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 0.0, cond_scale: float = 1.0, compile: bool = False,
                      known_codes: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                      callback: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
        """Image codes (rows, h, w) for `rows` token rows at a time, in order, all drawn from `generator`.
        `callback(tokens)` after each decode step: image tokens drawn so far over all rows."""
        done = 0
        for chunk in text.split(rows):
            step = None if callback is None else (lambda i, done=done, b=len(chunk): callback(done + b * i))
            yield generate_codes(self.transformer, chunk, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator, cond_scale=cond_scale, compile=compile,
                                 known_codes=None if known_codes is None else known_codes.expand(len(chunk), -1, -1),
                                 known_mask=known_mask, callback=step)
            done += len(chunk) * self.transformer.config.image_seq_len

    def decode(self, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Codes (B, h, w) -> fp32 CPU images (B, 3, H, W) in [0, 1], `batch_size` at a time."""
        return torch.cat([self.dvae.decode(c).float().cpu() for c in codes.split(batch_size)])

    def likelihood(self, text: torch.Tensor, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Each candidate's sum of image-token log-probs under the transformer (B,)."""
        return log_likelihood(self.transformer, text, codes, batch_size)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], cfg: SampleConfig, known_codes: torch.Tensor | None = None,
                 known_mask: torch.Tensor | None = None, progress: bool = False, likelihood: bool | None = None,
                 callback: Callable[[int, int], None] | None = None) -> dict:
        """cfg.num_candidates images per prompt: {"images": (P, N, 3, H, W) in [0, 1], "seconds": sampling +
        decoding time, "likelihood": (P, N) when `likelihood` (default: cfg.rank_by == "likelihood") else None,
        "clip_cosine": (P, N) under the pipeline's CLIP, or None without one}. cfg.batch_size rows run at once
        (guidance: 2 rows per candidate). The likelihood is a teacher-forced pass: it draws nothing, so asking for
        it leaves the images as they are. `callback(done, total)` follows the sampling in image tokens drawn (for a
        progress display: the playground's bar)."""
        if cfg.cond_scale != 1.0 and self.transformer.config.null_cond_prob == 0:
            print(f"warning: {self.name} was trained without caption dropout (null_cond_prob 0): its unconditional "
                  f"branch is untrained and --cond-scale {cfg.cond_scale} may hurt; retrain with --null_cond_prob 0.1")
        N = cfg.num_candidates
        text = self.encode(prompts, N)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        rows = max(1, cfg.batch_size // (2 if cfg.cond_scale != 1.0 else 1))
        codes, images = [], []
        bar = tqdm(total=len(prompts), unit="prompt", desc="sampling", disable=not progress)
        start, done = time.perf_counter(), 0
        total = len(text) * self.transformer.config.image_seq_len
        step = None if callback is None else (lambda tokens: callback(tokens, total))
        for c in self.sample_chunks(text, rows, gen, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    cond_scale=cfg.cond_scale, compile=cfg.compile, known_codes=known_codes,
                                    known_mask=known_mask, callback=step):
            codes.append(c)
            images.append(self.dvae.decode(c).float().cpu())
            done += len(c)
            bar.update(done // N - bar.n)
        bar.close()
        seconds = time.perf_counter() - start
        codes, images = torch.cat(codes), torch.cat(images)
        out = {"images": images.view(len(prompts), N, *images.shape[1:]), "seconds": seconds, "likelihood": None,
               "clip_cosine": None}
        if cfg.rank_by == "likelihood" if likelihood is None else likelihood:
            out["likelihood"] = self.likelihood(text, codes, cfg.batch_size).float().cpu().view(len(prompts), N)
        if self.clip is not None:
            out["clip_cosine"] = torch.stack([self.clip.scores(cands, [p])[:, 0].cpu()
                                              for p, cands in zip(prompts, out["images"])])
        return out
