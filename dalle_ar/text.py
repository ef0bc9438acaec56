"""Caption tokenizer: a byte-level BPE trained with `tokenizers`, encoded to a fixed `text_len`.

DALL-E (section 2.2) pads every caption to 256 positions with a *distinct* pad token per position, so
the model can tell "no more text at position i" apart from any other position. Pad ids therefore live
after the BPE vocabulary: the pad at position i has id `bpe_vocab_size + i`. The all-pad caption
(`null_caption`) is also the "no caption" input of classifier-free guidance in every model here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_ar.config import ConfigError

UNK = "[UNK]"


def train_bpe(captions: Iterable[str], vocab_size: int = 16384, min_frequency: int = 2) -> Tokenizer:
    """Train a lower-cased byte-level BPE on captions (no unknown tokens possible)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    return tok


def null_caption(vocab_size: int, text_len: int, batch: int = 1, device=None) -> torch.Tensor:
    """The all-pad caption, (batch, text_len) ids `vocab_size + i` (an expanded view: clone to write).
    What an empty caption encodes to, and the null condition that caption dropout trains for guidance."""
    return torch.arange(text_len, device=device).add(vocab_size).expand(batch, -1)


class TextTokenizer:
    """Fixed-length caption encoder with per-position pad tokens. Overlong captions are truncated and
    counted (`num_truncated`, and as the note "long_caption" in `skips`, a data.decode.SkipCounter)."""

    def __init__(self, tokenizer: Tokenizer, text_len: int, skips=None):
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.num_truncated = 0  # captions longer than text_len seen so far (counted, not fatal)
        self.skips = skips

    @classmethod
    def load(cls, path: str | Path, text_len: int, skips=None) -> "TextTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer not found; train one with `python train/train_tokenizer.py "
                                    f"--data <shards> --out {path.parent}` or pass --tokenizer <path/to/tokenizer.json>")
        return cls(Tokenizer.from_file(str(path)), text_len, skips)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        """BPE vocabulary size (pad ids come after it)."""
        return self.tokenizer.get_vocab_size()

    @property
    def num_text_tokens(self) -> int:
        return self.vocab_size + self.text_len

    def pad_id(self, position: int) -> int:
        return self.vocab_size + position

    def null_caption(self, batch: int = 1, device=None) -> torch.Tensor:
        return null_caption(self.vocab_size, self.text_len, batch, device)

    def check_fits(self, text: str) -> None:
        """ConfigError unless `text` is a caption that fits the text slots whole (not empty, at most text_len BPE
        tokens): for interactive prompts, where silent truncation would sample an image of another caption."""
        clean = text.encode("utf-8", "replace").decode("utf-8").strip()
        if not clean:
            raise ConfigError("empty prompt: type a caption, e.g. 'a small red circle on the left'")
        n = len(self.tokenizer.encode(clean).ids)
        if n > self.text_len:
            raise ConfigError(f"prompt too long: {n} BPE tokens, the model reads at most {self.text_len}; shorten it")

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(B, text_len) long ids; overlong captions are truncated (and counted)."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.null_caption(len(texts)).clone()
        # Lone surrogates (possible in a Python str, e.g. from surrogateescape) cannot cross into Rust: replace them.
        clean = [t.encode("utf-8", "replace").decode("utf-8").strip() for t in texts]
        for row, enc in enumerate(self.tokenizer.encode_batch(clean)):
            ids = enc.ids
            if len(ids) > self.text_len:
                self.num_truncated += 1
                if self.skips is not None:
                    self.skips.note("long_caption")
                ids = ids[: self.text_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        ids = torch.as_tensor(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        keep = [i for i in ids.tolist() if i < self.vocab_size]
        return self.tokenizer.decode(keep).strip()


def check_vocab(tokenizer: TextTokenizer, cfg, source: str) -> None:
    """A DalleConfig and the tokenizer it is used with must agree on the BPE vocabulary and text_len:
    another tokenizer's ids index the wrong (or no) rows of the text embedding."""
    if tokenizer.vocab_size != cfg.text_vocab_size:
        raise ConfigError(f"{source}: the model has a {cfg.text_vocab_size}-token BPE vocabulary (text_vocab_size) but "
                          f"the tokenizer has {tokenizer.vocab_size}; use the tokenizer.json the model was trained with "
                          f"(saved in its export directory)")
    if tokenizer.text_len != cfg.text_len:
        raise ConfigError(f"{source}: the model reads {cfg.text_len} text tokens (text_len) but the tokenizer pads to "
                          f"{tokenizer.text_len}; load the tokenizer with text_len={cfg.text_len}")
