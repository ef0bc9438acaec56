import pytest
import torch

from dalle_ar.data import synthetic
from dalle_ar.text import TextTokenizer, train_bpe

CAPTIONS = [synthetic.make_example(i)[1] for i in range(500)]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(train_bpe(CAPTIONS, vocab_size=400), text_len=16)


def test_round_trip(tok):
    for text in CAPTIONS[:50] + ["A Large RED circle", "a cat on a mat, 42!"]:
        assert tok.decode(tok.encode(text)[0]) == text.lower()


def test_pads_are_distinct_per_position(tok):
    ids = tok.encode(["a red circle", ""])
    n = len(tok.tokenizer.encode("a red circle").ids)
    assert ids.shape == (2, 16)
    assert ids[0, n:].tolist() == [tok.vocab_size + i for i in range(n, 16)]
    assert ids[1].tolist() == [tok.vocab_size + i for i in range(16)]  # empty caption: all pads
    assert ids.max() < tok.num_text_tokens


def test_overlong_captions_are_truncated_and_counted(tok):
    long = " ".join(CAPTIONS[:10])
    ids = tok.encode([long, CAPTIONS[0]])
    assert (ids[0] < tok.vocab_size).all()
    assert tok.num_truncated == 1


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path, text_len=16)
    assert torch.equal(again.encode(CAPTIONS[:8]), tok.encode(CAPTIONS[:8]))
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py"):
        TextTokenizer.load(tmp_path / "missing", 16)
