"""CLIP embedding shards for the unCLIP prior and decoder, written once by `train/precompute_clip.py`.

Each image shard `.../NAME.tar` gets `<emb>/NAME.tar` with, per sample that decoded, `KEY.img_emb.npy`
and `KEY.txt_emb.npy` (unit-norm float32 CLIP embeddings) and `KEY.txt` (the caption). Keys and order are
those of the image shard, so the decoder reads an image shard and its embedding shard side by side
(`image_embedding_dataset`); the prior needs only the embedding shards (`embedding_dataset`).
`<emb>/meta.json` names the CLIP (its path and the sha256 of its weights) and the image shards they came from, so
`reusable` can tell whether a directory already holds the embeddings a run needs (train/train_matched.py --embeddings).
Writing, resuming and progress records are `write.TokenShards`' (one record per finished shard); reading
composes an embedding decode stage on `read.raw_dataset`, as `read.image_text_dataset` does for images.
"""

from __future__ import annotations

import hashlib
import io
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dalle_ar.config import ConfigError, load_json
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import MAX_SKIPS_IN_A_ROW, FluidPipeline, decoded, image_text_dataset, raw_dataset, shard_urls
from dalle_ar.data.write import TokenShards, token_shard_name

META = "meta.json"


def source(spec: str) -> str:
    """How meta.json names a CLIP or an image shard set: the absolute path when `spec` is a local file or directory,
    else `spec` as given (a glob, a brace pattern, a URL, ARCH:/weights)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def clip_fingerprint(spec: str) -> str:
    """sha256 over the CLIP's weight files (an export directory, or ARCH:/path/weights)."""
    path = Path(spec)
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".pt", ".bin")) if path.is_dir() \
        else [Path(spec.partition(":")[2])]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def reusable(embeddings: str | Path, clip: str, images: str) -> bool:
    """Whether `embeddings` already holds the finished embeddings of every shard of `images` under `clip`: True when
    it does; False when it holds none or only part of them (train/precompute_clip.py resumes those); a ConfigError
    when its meta.json says they came from another CLIP (path or weights) or other image shards."""
    out = Path(embeddings)
    if not (out / META).exists():
        return False
    meta = load_json(out / META)
    made = {"--clip": (meta.get("clip"), source(clip)), "--train-images": (meta.get("images"), source(images))}
    for flag, (recorded, given) in made.items():
        if recorded is not None and source(recorded) != given:
            raise ConfigError(f"{out / META}: made from {recorded}, not {flag} {given}; pass another --embeddings "
                              f"directory, or delete {out} to recompute them")
    if meta.get("clip_sha256") not in (None, clip_fingerprint(clip)):
        raise ConfigError(f"{out / META}: made from other weights than --clip {clip} holds now (sha256 differs); "
                          f"pass another --embeddings directory, or delete {out} to recompute them")
    names = [token_shard_name(url) for url in shard_urls(images)]
    return all((out / name).exists() and (out / "progress" / (name[:-len(".tar")] + ".json")).exists() for name in names)


def embedding_sample(key: str, image_embed: np.ndarray, text_embed: np.ndarray, caption: str) -> dict:
    return {"__key__": key, "img_emb.npy": np.asarray(image_embed, dtype=np.float32),
            "txt_emb.npy": np.asarray(text_embed, dtype=np.float32), "txt": caption}


class EmbeddingShards(TokenShards):
    """`TokenShards` with embedding samples; the records' model fields name the CLIP (spec, sha256)."""

    def __init__(self, out_dir: str | Path, urls: list[str], clip: str, fingerprint: str):
        for path in sorted((Path(out_dir) / "progress").glob("*.json")):
            if load_json(path).get("dvae_sha256") != fingerprint:
                raise ConfigError(f"{path}: {out_dir} holds embeddings from another CLIP ({load_json(path).get('dvae')}); "
                                  f"pass a new --out, or delete {out_dir} to recompute everything")
        super().__init__(out_dir, urls, clip, fingerprint)

    def write(self, url: str, keys: list[str], image_embeds: np.ndarray, text_embeds: np.ndarray,
              captions: list[str]) -> None:
        if url not in self._open:
            self._open[url] = (wds.TarWriter(open(self._tmp(url), "wb"), mtime=0), 0)
        sink, n = self._open[url]
        for key, zi, zt, caption in zip(keys, image_embeds, text_embeds, captions):
            sink.write(embedding_sample(key, zi, zt, caption))
        self._open[url] = (sink, n + len(keys))

    def finish(self, url: str, num_samples: int, skipped: dict[str, int]) -> dict:
        if url not in self._open:
            self.write(url, [], [], [], [])
        return super().finish(url, num_samples, skipped)


def read_meta(embeddings: str | Path) -> dict:
    path = Path(embeddings) / META
    if not path.exists():
        raise FileNotFoundError(f"{path}: no embedding metadata; compute the embeddings first with "
                                f"`python train/precompute_clip.py --clip <clip export> --data <image shards> --out {embeddings}`")
    return load_json(path)


def _load_vector(data: bytes) -> torch.Tensor:
    array = np.load(io.BytesIO(data), allow_pickle=False)  # a data file never runs code
    if array.ndim != 1 or array.dtype.kind != "f":
        raise ValueError(f"expected a 1-d float embedding, got {array.dtype} array of shape {array.shape}")
    return torch.from_numpy(array.astype(np.float32))


def _embedding_text(sample: dict):
    """A raw sample -> (image_embed, text_embed, caption, key); a missing member, corrupt .npy or bad caption raises
    (counted as `other` by the `read.decoded` stage)."""
    zi, zt = _load_vector(sample["img_emb.npy"]), _load_vector(sample["txt_emb.npy"])
    return zi, zt, sample["txt"].decode("utf-8").strip(), sample["__key__"]


def embedding_dataset(spec: str | list[str], *, resampled: bool = False, shuffle: int = 0, seed: int = 0,
                      skips: SkipCounter | None = None, split: bool = True):
    """Yields (image_embed (D,) float, text_embed (D,) float, caption str, key)."""
    skips = skips if skips is not None else SkipCounter()
    return raw_dataset(spec, resampled, shuffle, seed, skips, split).compose(
        partial(decoded, skips=skips, decode=_embedding_text, max_in_a_row=MAX_SKIPS_IN_A_ROW))


def _paired_samples(image_size: int, embeddings: Path, skips: SkipCounter):
    """Stage: shard urls -> (image, caption, image_embed, text_embed, key), each image shard read beside
    its embedding shard (same keys, same order: both skip the same undecodable images)."""

    def stage(source):
        for item in source:
            url = item["url"]
            emb_url = embeddings / token_shard_name(url)
            if not emb_url.exists():
                raise FileNotFoundError(f"{emb_url}: no embeddings for image shard {url}; run train/precompute_clip.py "
                                        f"on the same --data (it resumes and adds the missing shards)")
            images = image_text_dataset([url], image_size, skips=skips, split=False)
            # a corrupt embedding sample surfaces as a key mismatch below; not counted twice in `skips`
            embeds = embedding_dataset([str(emb_url)], skips=SkipCounter(), split=False)
            for (image, caption, key), (zi, zt, _, ekey) in zip(images, embeds):
                if key != ekey:
                    raise ConfigError(f"{emb_url}: sample {ekey} where {url} has {key}; the embeddings were computed "
                                      f"from other shards: recompute them into a new --out")
                yield image, caption, zi, zt, key
    return stage


def image_embedding_dataset(spec: str, embeddings: str | Path, image_size: int, *, shuffle: int = 1000, seed: int = 0,
                            skips: SkipCounter | None = None):
    """Endless (image (3,S,S) [0,1], caption, image_embed, text_embed, key) stream for the decoder: image shards
    drawn with replacement (seeded by seed, rank and DataLoader worker, like `image_text_dataset(resampled=True)`),
    each read beside its embedding shard."""
    urls = shard_urls(spec)
    skips = skips or SkipCounter()
    ds = FluidPipeline(wds.ResampledShards(urls, seed=seed, deterministic=True), _paired_samples(image_size, Path(embeddings), skips))
    return ds.shuffle(shuffle, seed=seed) if shuffle else ds
