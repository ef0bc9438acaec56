"""Property tests (hypothesis): the caption tokenizer takes any text, and the shapes-world caption parser
takes any string and inverts every caption the world writes."""

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle_ar.data import synthetic
from dalle_ar.text import TextTokenizer, train_bpe

TEXT_LEN = 16
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every code point but lone surrogates: emoji, CJK, combining marks, control characters, NUL, private use
any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=("Cs",))
any_text = st.one_of(
    st.text(any_char, max_size=64),
    st.text(any_char, min_size=1, max_size=20).map(lambda s: s * 300),  # very long: thousands of characters
    st.sampled_from(["", " ", "\n\t\r", "\x00", "🦄🌈" * 50, "a\u0301" * 40, "\ufeffa red circle", "İSTANBUL"]),
)


@lru_cache(maxsize=1)
def tokenizer() -> TextTokenizer:
    captions = [synthetic.make_example(i)[1] for i in range(200)] + ["a photo of a cat", "ein Hund im Schnee"]
    return TextTokenizer(train_bpe(captions, vocab_size=300), text_len=TEXT_LEN)


@SETTINGS
@given(any_text)
def test_any_text_encodes_to_text_len_ids_in_the_vocabulary(text):
    tok = tokenizer()
    ids = tok.encode(text)
    assert ids.shape == (1, TEXT_LEN)
    assert 0 <= ids.min() and ids.max() < tok.num_text_tokens
    # every slot is a BPE id or the pad of exactly that position, and pads only follow text
    row = ids[0].tolist()
    pads = [i for i, t in enumerate(row) if t >= tok.vocab_size]
    assert all(row[i] == tok.pad_id(i) for i in pads)
    assert pads == list(range(TEXT_LEN - len(pads), TEXT_LEN))


@SETTINGS
@given(st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=8))
def test_lone_surrogates_do_not_crash_the_encoder(text):
    assert tokenizer().encode(["a red circle", text]).shape == (2, TEXT_LEN)


@SETTINGS
@given(st.lists(any_text, min_size=1, max_size=6))
def test_batch_encode_equals_single_encodes(texts):
    tok = tokenizer()
    batch = tok.encode(texts)
    assert batch.shape == (len(texts), TEXT_LEN)
    for row, text in zip(batch, texts):
        assert row.tolist() == tok.encode(text)[0].tolist()


@SETTINGS
@given(st.integers(0, 10**9), st.integers(0, 1000))
def test_world_captions_round_trip_through_the_tokenizer(index, seed):
    _, caption = synthetic.make_example(index, seed=seed, image_size=16)
    roomy = TextTokenizer(tokenizer().tokenizer, text_len=64)  # two-shape captions need more than 16 slots
    assert roomy.decode(roomy.encode(caption)[0]) == caption
    short = tokenizer().decode(tokenizer().encode(caption)[0])  # truncated: a prefix of the caption
    assert caption.startswith(short)


@SETTINGS
@given(st.one_of(any_text, st.text(st.sampled_from(list("abcdeilmnoprstuvwy .")), max_size=80)))
def test_caption_parser_never_crashes(text):
    try:
        spec = synthetic.parse_caption(text)
    except ValueError:
        assert not synthetic.is_caption(text)
        return
    assert synthetic.is_caption(text) and 1 <= len(spec.shapes) <= 2


@SETTINGS
@given(st.integers(0, 10**9), st.integers(0, 1000), st.booleans(), st.sampled_from(["", ".", " .", "  "]))
def test_every_world_caption_parses_to_its_scene(index, seed, shout, tail):
    scene = synthetic.sample_scene(np.random.default_rng([seed, index]))  # what make_example draws
    _, caption = synthetic.make_example(index, seed=seed, image_size=16)
    assert caption == synthetic.caption(scene)
    assert synthetic.parse_caption(caption) == scene.spec
    noisy = "  " + "  ".join(caption.split()) + tail  # case, spacing and a trailing period are tolerated
    assert synthetic.parse_caption(noisy.upper() if shout else noisy) == scene.spec


@SETTINGS
@given(st.integers(0, 10**9), st.data())
def test_a_wrong_word_makes_a_caption_unparseable(index, data):
    words = synthetic.make_example(index, image_size=16)[1].split()
    i = data.draw(st.integers(0, len(words) - 1))
    words[i] = data.draw(st.sampled_from(["huge", "pink", "hexagon", "beside", "circles", "xx"]))
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        synthetic.parse_caption(" ".join(words))
