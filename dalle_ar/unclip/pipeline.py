"""unCLIP end to end: caption -> CLIP text embedding -> prior -> image embedding -> decoder (-> upsampler),
and the image manipulations of the paper (section 3): variations, interpolations, text diffs.

    pipe = UnclipPipeline.load("runs/prior/export", "runs/decoder/export", device="cuda")
    images = pipe.generate(["a red circle"], num_candidates=8, seed=0)      # (P, N, 3, H, W) in [0, 1]

Every method takes a seed and draws all its noise from one CPU `torch.Generator`, so the same call gives
the same images on any device (up to kernel numerics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from dalle_ar.checkpoint import load_pretrained
from dalle_ar.clip import ClipScorer
from dalle_ar.text import TextTokenizer
from dalle_ar.unclip.decoder import UnetDecoder, build_decoder
from dalle_ar.unclip.prior import DiffusionPrior, build_prior


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors (B, D), theta in [0, 1] (paper eq. in section 3.2)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.acos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    theta = torch.as_tensor(theta, dtype=a.dtype, device=a.device).view(-1, 1)
    return (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / torch.sin(omega)


class UnclipPipeline:
    def __init__(self, prior: DiffusionPrior, decoder: UnetDecoder, clip: ClipScorer, tokenizer: TextTokenizer,
                 upsampler: UnetDecoder | None = None, decoder_tokenizer: TextTokenizer | None = None,
                 device: str | torch.device = "cpu"):
        self.prior, self.decoder, self.upsampler = prior, decoder, upsampler
        self.clip, self.tokenizer = clip, tokenizer
        self.decoder_tokenizer = decoder_tokenizer
        self.device = torch.device(device)
        if decoder.config.embed_dim != prior.config.embed_dim:
            raise ValueError(f"prior makes {prior.config.embed_dim}-d embeddings, decoder takes {decoder.config.embed_dim}-d: "
                             f"train both on the same embeddings (train/precompute_clip.py)")

    @classmethod
    def load(cls, prior_dir: str | Path, decoder_dir: str | Path, clip_spec: str | None = None,
             device: str | torch.device = "cpu", upsampler_dir: str | Path | None = None) -> "UnclipPipeline":
        """Exported (EMA) weights of each stage; the CLIP defaults to the one the prior's embeddings came from."""
        device = str(device)
        prior, prior_cfg = load_pretrained(prior_dir, build_prior, device)
        decoder, decoder_cfg = load_pretrained(decoder_dir, build_decoder, device)
        clip_spec = clip_spec or prior_cfg.get("clip")
        if not clip_spec:
            raise FileNotFoundError(f"{Path(prior_dir) / 'config.json'} names no CLIP; pass clip_spec (--clip)")
        tok = TextTokenizer.load(Path(prior_dir) / "tokenizer.json", prior.config.text_len)
        dec_tok = (TextTokenizer.load(Path(decoder_dir) / "tokenizer.json", decoder.config.text_len)
                   if decoder.config.use_caption else None)
        upsampler = load_pretrained(upsampler_dir, build_decoder, device)[0] if upsampler_dir else None
        if upsampler is not None and upsampler.config.low_res_size != decoder.config.image_size:
            raise ValueError(f"{upsampler_dir}: upsampler takes {upsampler.config.low_res_size}px, decoder makes "
                             f"{decoder.config.image_size}px; train the upsampler with --low_res_size "
                             f"{decoder.config.image_size}")
        return cls(prior, decoder, ClipScorer.load(clip_spec, device), tok, upsampler, dec_tok, device)

    @property
    def image_size(self) -> int:
        return (self.upsampler or self.decoder).config.image_size

    @property
    def input_size(self) -> int:
        """The side CLIP sees images at: load the inputs of variations, interpolations and text diffs at it."""
        pre = self.clip.model.visual.preprocess_cfg["size"]
        return pre if isinstance(pre, int) else pre[0]

    def check_prompt(self, prompt: str) -> None:
        """ConfigError for a caption the prior cannot read whole (empty, or over its text slots)."""
        self.tokenizer.check_fits(prompt)

    # -- the stages ----------------------------------------------------------------------------------
    def _decoder_text(self, captions: Sequence[str] | None) -> torch.Tensor | None:
        if captions is None or self.decoder_tokenizer is None:
            return None
        return self.decoder_tokenizer.encode(list(captions)).to(self.device)

    def decode(self, image_embed: torch.Tensor | None, captions: Sequence[str] | None = None, *, steps: int,
               guidance: float, generator: torch.Generator, noise: torch.Tensor | None = None, eta: float = 0.0,
               upsampler_steps: int | None = None, text_guidance: float | None = None,
               progress: bool = False) -> torch.Tensor:
        """Image embeddings (B, D) -> images (B, 3, H, W) in [0, 1] (through the upsampler when loaded). With
        `image_embed` None, a decoder that reads the caption draws from the caption alone (its null image embedding,
        which it trained on 10% of the time: GLIDE's conditioning, from the same network)."""
        text = self._decoder_text(captions)
        if image_embed is None and text is None:
            raise ValueError("decode needs image embeddings, or captions for a decoder trained with --use_caption")
        images = self.decoder.sample(None if image_embed is None else image_embed.to(self.device), text, steps=steps,
                                     guidance=guidance, text_guidance=text_guidance, eta=eta, generator=generator,
                                     noise=noise, progress=progress)
        if self.upsampler is not None:  # unguided, as the paper's upsamplers
            images = self.upsampler.sample(low_res=images, steps=upsampler_steps or steps, generator=generator,
                                           progress=progress)
        return images

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], num_candidates: int = 1, *, seed: int = 0, prior_steps: int = 64,
                 decoder_steps: int = 64, prior_guidance: float = 1.0, decoder_guidance: float = 3.0,
                 batch_size: int = 16, prior_candidates: int = 2, upsampler_steps: int | None = None,
                 decoder_text_guidance: float | None = None, progress: bool = False) -> torch.Tensor:
        """`num_candidates` images per prompt: (P, N, 3, H, W) in [0, 1].

        Each candidate gets its own prior sample (the best of `prior_candidates` by similarity to the text
        embedding) and decoder sample; `batch_size` candidates run at once. Steps are DDIM (eta 0) steps
        on the respaced schedule; guidance scales are classifier-free (1 = off). `decoder_text_guidance` guides a
        caption-reading decoder's caption on its own scale (None: the decoder guidance for both conditions)."""
        g = torch.Generator().manual_seed(seed)
        flat = [p for p in prompts for _ in range(num_candidates)]
        out = []
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            text_embed = self.clip.encode_texts(chunk).to(self.device)
            z = self.prior.sample(self.tokenizer.encode(chunk).to(self.device), text_embed, steps=prior_steps,
                                  guidance=prior_guidance, candidates=prior_candidates, generator=g, progress=progress)
            out.append(self.decode(z, chunk, steps=decoder_steps, guidance=decoder_guidance, generator=g,
                                   upsampler_steps=upsampler_steps, text_guidance=decoder_text_guidance,
                                   progress=progress).cpu())
        images = torch.cat(out)
        return images.view(len(prompts), num_candidates, *images.shape[1:])

    # -- manipulations (paper section 3) --------------------------------------------------------------
    def image_embed(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> unit-norm CLIP image embeddings."""
        return self.clip.encode_images(images.to(self.device))

    @torch.no_grad()
    def variations(self, image: torch.Tensor, n: int = 8, *, seed: int = 0, steps: int = 64, guidance: float = 3.0,
                   eta: float = 1.0, progress: bool = False) -> torch.Tensor:
        """n images with the same CLIP image embedding as `image` (3, H, W) (paper section 3.1: DDIM with
        eta > 0, so the noise makes them differ in what CLIP does not encode). (n, 3, H', W')."""
        z = self.image_embed(image[None]).expand(n, -1)
        return self.decode(z, steps=steps, guidance=guidance, eta=eta,
                           generator=torch.Generator().manual_seed(seed), progress=progress).cpu()

    @torch.no_grad()
    def interpolate(self, image_a: torch.Tensor, image_b: torch.Tensor, steps: int = 8, *, seed: int = 0,
                    decoder_steps: int = 64, guidance: float = 3.0) -> torch.Tensor:
        """Decode slerp(z_a, z_b, theta) for `steps` thetas in [0, 1] with one fixed decoder noise and the
        deterministic sampler (eta 0), so only the embedding changes along the row (paper section 3.2)."""
        za, zb = self.image_embed(torch.stack([image_a, image_b])).chunk(2)
        z = slerp(za.expand(steps, -1), zb.expand(steps, -1), torch.linspace(0, 1, steps))
        return self._fixed_noise_decode(z, seed, decoder_steps, guidance)

    @torch.no_grad()
    def text_diff(self, image: torch.Tensor, caption_from: str, caption_to: str, steps: int = 6, *, seed: int = 0,
                  max_theta: float = 0.5, decoder_steps: int = 64, guidance: float = 3.0, invert: bool = True) -> torch.Tensor:
        """Move the image embedding towards the text diff z_d = norm(z_t(to) - z_t(from)): decode
        slerp(z_i, z_d, theta) for theta in [0, max_theta] (paper section 3.3). With `invert`, the decoder
        noise is the DDIM inversion of the image under its own embedding (as the paper), so theta = 0
        reconstructs it; otherwise one fixed random noise."""
        z_i = self.image_embed(image[None])
        t_from, t_to = self.clip.encode_texts([caption_from, caption_to]).to(self.device).chunk(2)
        z_d = F.normalize(t_to - t_from, dim=-1)
        z = slerp(z_i.expand(steps, -1), z_d.expand(steps, -1), torch.linspace(0, max_theta, steps))
        noise = None
        if invert:
            size = self.decoder.config.image_size
            small = F.interpolate(image[None].float().to(self.device), size=(size, size), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
            noise = self.decoder.invert(small, z_i, steps=decoder_steps).expand(steps, -1, -1, -1)
        return self._fixed_noise_decode(z, seed, decoder_steps, guidance, noise)

    def _fixed_noise_decode(self, z: torch.Tensor, seed: int, steps: int, guidance: float,
                            noise: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if noise is None:
            s = self.decoder.config.image_size
            noise = torch.randn((1, 3, s, s), generator=g).expand(len(z), -1, -1, -1)
        return self.decode(z, steps=steps, guidance=guidance, eta=0.0, generator=g, noise=noise.to(self.device)).cpu()

