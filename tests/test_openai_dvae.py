"""Import of OpenAI's published dVAE pickles, tested with files made the way theirs were: modules of OpenAI's own
`dall_e` package (the registry's dall-e 0.1, installed by `make setup`) saved whole with torch.save in the 2021
formats, then loaded without that package."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_ar import models
from dalle_ar.config import ConfigError
from dvae.model import map_pixels
from dvae.openai import UnsafePickleError, import_openai_dvae

ROOT = Path(__file__).parents[1]
SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)  # group_count is their class attribute (4)


def _openai_dall_e():
    import dall_e  # `make setup` installs dall-e==0.1 with --no-deps (it pins nothing we need; attrs is in [test])
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    assert "site-packages" in dall_e.__file__, dall_e.__file__  # OpenAI's code, not a look-alike
    return Encoder, Decoder


def _forget_dall_e():
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """encoder.pkl / decoder.pkl saved whole (legacy and zip formats), plus their outputs on fixed inputs."""
    Encoder, Decoder = _openai_dall_e()
    torch.manual_seed(0)
    enc, dec = Encoder(**SMALL), Decoder(n_init=32, **SMALL)
    with torch.no_grad():  # their biases start at zero; make them matter
        for p in [*enc.parameters(), *dec.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 3, 32, 32)
    z = torch.nn.functional.one_hot(torch.randint(0, 512, (2, 4, 4)), 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits, stats = enc(map_pixels(x)), dec(z)
    for m in dec.modules():  # as pickled by torch < 1.11: Upsample without `recompute_scale_factor`
        if isinstance(m, torch.nn.Upsample):
            del m.recompute_scale_factor
    root = tmp_path_factory.mktemp("openai")
    torch.save(enc, root / "encoder.pkl")
    torch.save(dec, root / "decoder.pkl", _use_new_zipfile_serialization=False)  # 2021-era legacy format
    _forget_dall_e()
    return root, x, z, logits, stats


def test_import_reproduces_their_outputs_exactly(openai_files):
    root, x, z, logits, stats = openai_files
    assert "dall_e" not in sys.modules
    model, provenance = import_openai_dvae(root / "encoder.pkl", root / "decoder.pkl", image_size=32)
    assert "dall_e" not in sys.modules  # nothing was imported from the pickle
    cfg = model.config
    assert (cfg.num_tokens, cfg.n_hid, cfg.n_blk_per_group, cfg.n_init, cfg.grid_size) == (512, 64, 1, 32, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decoder(z), stats, rtol=1e-5, atol=1e-5)
        codes = z.argmax(1)  # the lookup path equals the one-hot conv path
        torch.testing.assert_close(model.decoder.from_codes(codes), stats, rtol=1e-5, atol=1e-5)
    assert len(provenance["encoder_sha256"]) == 64


def test_convert_cli_writes_safetensors_that_load_without_pickles(openai_files, tmp_path):
    root, x, _, logits, _ = openai_files
    out = tmp_path / "openai_dvae"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "train/convert_openai_dvae.py"), "--encoder", str(root / "encoder.pkl"),
                        "--decoder", str(root / "decoder.pkl"), "--out", str(out), "--image_size", "32"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "restricted unpickler" in r.stderr
    model, config = models.load(out)
    assert config["source"]["format"] == "openai-dall_e"
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), logits, rtol=1e-5, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_foreign_globals_without_running_them(tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(UnsafePickleError, match=r"encoder.pkl: refusing to load global '(posix|os)\.system'"):
        import_openai_dvae(path, path)


def test_clear_errors_for_missing_swapped_and_garbage_files(openai_files, tmp_path):
    root = openai_files[0]
    with pytest.raises(FileNotFoundError, match="nope.pkl: not found"):
        import_openai_dvae(tmp_path / "nope.pkl", root / "decoder.pkl")
    with pytest.raises(ConfigError, match="swap"):
        import_openai_dvae(root / "decoder.pkl", root / "encoder.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(ConfigError, match="garbage.pkl: cannot be read"):
        import_openai_dvae(garbage, root / "decoder.pkl")
    state_only = tmp_path / "state.pkl"
    torch.save({"w": torch.zeros(1)}, state_only)
    with pytest.raises(ConfigError, match="state.pkl: holds a dict"):
        import_openai_dvae(state_only, root / "decoder.pkl")
