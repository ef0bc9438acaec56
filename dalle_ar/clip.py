"""CLIP through open_clip: build small models from config, train them on our shards, load local
checkpoints (ours or a user's), embed, and rerank generated candidates (DALL-E section 2.6).

An exported CLIP directory is also an open_clip `local-dir:` model (`open_clip_config.json` +
`model.safetensors`), so `open_clip.create_model("local-dir:<dir>")` opens it without this package.
Nothing here ever downloads: pretrained *tags* are refused, only local files are accepted.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ar.config import ClipConfig, ConfigError, from_dict

OPEN_CLIP_CONFIG = "open_clip_config.json"


def _write_open_clip_dir(cfg: ClipConfig, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": cfg.open_clip_dict(), "preprocess_cfg": {}}, indent=2))
    return directory


def build_clip(cfg: ClipConfig) -> nn.Module:
    """A randomly initialised open_clip model with our architecture (no weights touched)."""
    import open_clip

    with tempfile.TemporaryDirectory() as d:
        model = open_clip.create_model(f"local-dir:{_write_open_clip_dir(cfg, Path(d))}", load_weights=False)
    return model


def load_clip(spec: str, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a CLIP from local files only. `spec` is either
      - a directory: one exported by `train/train_clip.py`, or any open_clip `local-dir` model
        (`open_clip_config.json` + weights), or
      - `ARCH:/path/to/weights` for an open_clip architecture with a local checkpoint
        (e.g. `ViT-B-32:/models/vit_b_32.safetensors`).
    Returns (model in eval mode, tokenizer)."""
    import open_clip

    path = Path(spec)
    if path.is_dir():
        if not (path / OPEN_CLIP_CONFIG).exists():
            raise FileNotFoundError(f"{path}: no {OPEN_CLIP_CONFIG}; pass a CLIP export directory "
                                    f"(runs/<name>/export from train/train_clip.py) or ARCH:/path/weights")
        name = f"local-dir:{path}"
        model = open_clip.create_model(name, device=device)
    else:
        arch, sep, weights = spec.partition(":")
        if not sep or not Path(weights).is_file():
            raise FileNotFoundError(f"{weights if sep else spec}: CLIP checkpoint not found; pass an export directory, "
                                    f"ARCH:/local/weights or --clip-model ARCH --clip-checkpoint /local/weights "
                                    f"(pretrained tags would download, which dalle-ar never does)")
        if arch not in open_clip.list_models():
            near = [m for m in open_clip.list_models() if arch.lower().replace("/", "-") in m.lower()][:5]
            raise ConfigError(f"{spec}: unknown open_clip architecture {arch!r}; use one of open_clip.list_models()"
                              + (f", e.g. {', '.join(near)}" if near else " (e.g. ViT-B-32, RN50)"))
        name = arch
        model = open_clip.create_model(arch, pretrained=weights, device=device)
    return model.eval(), open_clip.get_tokenizer(name)


def clip_tokenizer(cfg: ClipConfig):
    import open_clip

    return open_clip.get_tokenizer("RN50", context_length=cfg.context_length)  # the packaged BPE, no download


class CachedTokenizer:
    """Wraps an open_clip tokenizer so that each distinct caption is encoded once: a training loop that sees the same
    captions again (the shapes world's few thousand, and their one-attribute-wrong variants) stops spending a few
    percent of every CLIP step re-running the BPE in Python. Rows are the wrapped tokenizer's; other attributes
    (`encode`, `context_length`) pass through. At most `max_captions` rows are kept (then the cache starts over)."""

    def __init__(self, tokenizer, max_captions: int = 200_000):
        self.tokenizer, self.max_captions, self.rows = tokenizer, max_captions, {}

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if missing:
            if len(self.rows) + len(missing) > self.max_captions:
                self.rows = {}
                missing = list(dict.fromkeys(texts))
            self.rows.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.rows[t] for t in texts])

    def __getattr__(self, name):  # only for what the instance lacks
        if name == "tokenizer":  # not set yet (e.g. while unpickling): no recursion through this method
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def overlong(tokenizer, texts: Sequence[str], tokens: torch.Tensor | None = None) -> list[tuple[str, int]]:
    """(caption, tokens with start and end) for each caption longer than the tokenizer's context_length: open_clip
    keeps the first context_length - 1 tokens and an end token without a word, so such a caption is scored on a
    prefix. `tokens`, the tokenizer's rows for `texts`, spares encoding again every caption whose row ends in padding
    (id 0; a full row ends in the end token).
    Empty for tokenizers without `encode` (Hugging Face ones), which cannot be checked this way."""
    encode, n = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or not n:
        return []
    if tokens is not None:
        texts = [t for t, full in zip(texts, (tokens[:, -1] != 0).tolist()) if full]
    lengths = [len(encode(t)) + 2 for t in texts]
    return [(t, k) for t, k in zip(texts, lengths) if k > n]


def export_files(cfg: ClipConfig, directory: Path) -> dict[str, str]:
    """Extra files a CLIP export carries (see module docstring)."""
    _write_open_clip_dir(cfg, directory)
    return {OPEN_CLIP_CONFIG: str(directory / OPEN_CLIP_CONFIG)}


def clip_config_from_export(config: dict) -> ClipConfig:
    return from_dict(ClipConfig, config["clip"], source="config.json")


def normalize_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> resized and normalised the way this CLIP was trained."""
    pre = model.visual.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(pre["mean"], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def contrastive_loss(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     negatives: torch.Tensor | None = None,
                     negative_images: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE (open_clip's ClipLoss) over the batch; images already normalised. `negatives`: token rows of
    extra captions that match no image (hard negatives, e.g. `synthetic.wrong_captions`): each image's softmax runs over
    the batch's captions and all of these, so a caption wrong in one word must score below the right one.
    `negative_images`: normalised images that match no caption (e.g. `synthetic.wrong_images`, a scene re-rendered with
    one attribute changed): each caption's softmax runs over the batch's images and all of these, as a reranking CLIP
    must put a caption's right image above a near miss."""
    import open_clip

    texts = tokens if negatives is None else torch.cat([tokens, negatives])
    if negative_images is not None:
        images = torch.cat([images, negative_images])
    out = model(images, texts)
    if isinstance(out, dict):
        img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        img, txt, scale = out[:3]
    metrics = {"logit_scale": float(scale.detach().float().reshape(-1)[0])}
    if negatives is None and negative_images is None:
        return open_clip.ClipLoss()(img.float(), txt.float(), scale.float()), metrics
    img, txt, scale = img.float(), txt.float(), scale.float()
    B = len(tokens)
    labels = torch.arange(B, device=img.device)
    per_image = scale * img[:B] @ txt.T              # (B, B + M): the batch's captions, then the negatives
    per_text = scale * txt[:B] @ img.T               # (B, B + M'): the batch's images, then the negative images
    loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    # how often an image prefers one of the negative captions to its own (a caption one of the negative images to its
    # own): the errors the negatives are there to fix
    for name, logits in (("negative_wins", per_image), ("negative_image_wins", per_text)):
        if logits.shape[1] > B:
            own = logits[labels, labels].detach()
            metrics[name] = float((logits[:, B:].detach() > own[:, None]).any(dim=1).float().mean())
    return loss, metrics


class ClipScorer:
    """Cosine similarity between images and captions under a CLIP model."""

    def __init__(self, model: nn.Module, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.num_truncated = 0  # captions longer than the CLIP's context seen so far (see encode_texts)

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu") -> "ClipScorer":
        model, tok = load_clip(spec, device)
        return cls(model, tok, device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        feats = [self.model.encode_image(normalize_images(self.model, chunk.to(self.device).float()), normalize=True)
                 for chunk in images.split(batch_size)]
        return torch.cat(feats).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text features. A caption longer than the CLIP's context is scored on its first tokens and
        counted in `num_truncated`; the first one also gets a warning that names it and the fix."""
        tokens = self.tokenizer(list(texts))
        for text, k in overlong(self.tokenizer, texts, tokens):
            if not self.num_truncated:
                n = self.tokenizer.context_length
                shown = text if len(text) <= 80 else text[:77] + "..."
                warnings.warn(f"CLIP reads {n} tokens, the caption {shown!r} has {k}: it is scored on its first {n - 2} "
                              f"tokens (later ones are counted in num_truncated); shorten it or use a CLIP with a longer "
                              f"context_length", stacklevel=2)
            self.num_truncated += 1
        return self.model.encode_text(tokens.to(self.device), normalize=True).float()

    def scores(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(num_images, num_texts) cosine similarities."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    def caption_logprob(self, images: torch.Tensor, caption: str, alternatives: Sequence[str]) -> torch.Tensor:
        """(num_images,) log p(caption | image) with the CLIP as a zero-shot classifier over `caption` and
        `alternatives` (e.g. `synthetic.variants`, the captions wrong in one attribute), at its own logit scale: high
        when an image fits its caption and none of the near misses. 0 for every image without alternatives."""
        logits = float(self.model.logit_scale.detach().exp()) * self.scores(images, [caption, *alternatives])
        return torch.log_softmax(logits, dim=1)[:, 0]


@torch.no_grad()
def retrieval(model: nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str]) -> dict:
    """Top-1 retrieval over a batch of (image i, caption i) pairs, in the model's own dtype and device: "i2t", the
    fraction of images whose most similar caption is theirs, "t2i" the converse (a caption with the same words counts
    as theirs), and "best_text", each image's most similar caption index."""
    p = next(model.parameters())
    img = model.encode_image(normalize_images(model, images.to(p.device, p.dtype)), normalize=True).float()
    txt = model.encode_text(tokenizer(list(texts)).to(p.device), normalize=True).float()
    cosine = (img @ txt.T).cpu()
    best_text, best_image = cosine.argmax(1).tolist(), cosine.argmax(0).tolist()
    return {"i2t": sum(texts[j] == texts[i] for i, j in enumerate(best_text)) / len(texts),
            "t2i": sum(texts[j] == texts[i] for i, j in enumerate(best_image)) / len(texts), "best_text": best_text}


def clip_score(cosine: torch.Tensor) -> torch.Tensor:
    """CLIP score (Hessel et al. 2021, CLIPScore with w = 100): 100 * max(cos, 0)."""
    return 100 * cosine.clamp(min=0)


def best_first(scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Indices of the k highest scores (all if k is None/0), best first; ties keep sampling order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k] if k else order


def rerank(scorer: ClipScorer, images: torch.Tensor, caption: str, top_k: int | None = None):
    """Order candidate images for one caption by CLIP cosine similarity (DALL-E section 2.6: sample N,
    keep the k best); returns (indices, cosines), best first."""
    s = scorer.scores(images, [caption])[:, 0]
    order = best_first(s, top_k)
    return order, s[order]


def clip_export_config(cfg: ClipConfig) -> dict:
    return {"kind": "clip", "clip": asdict(cfg)}
