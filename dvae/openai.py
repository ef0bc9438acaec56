"""Import OpenAI's published dVAE (`encoder.pkl`, `decoder.pkl`) without the `dall_e` package.

Those files are whole pickled `nn.Module`s (`dall_e.encoder.Encoder`, `dall_e.decoder.Decoder`), saved
with torch 1.7. Loading them the usual way needs the `dall_e` package on the path, `weights_only=False`
on torch >= 2.6 (which runs whatever the pickle names), and their `nn.Upsample` objects predate
attributes that newer torch expects at forward time.

Here the pickle is read by an unpickler that allows only:
  * the module classes of OpenAI's dVAE (`dall_e.*` and the few `torch.nn` containers/activations it
    uses) — rebuilt as inert `_Record`s that hold their attributes; none of their code runs;
  * tensors, parameters, storages, `OrderedDict`, `set`, `torch.device`.
Any other global (e.g. `os.system`, `builtins.eval`) stops the load with an error naming it. The
record tree is then walked into a flat state dict whose names already match `dvae.model` 1:1
(`blocks.group_1.block_1.res_path.conv_1.w`, ...), and the architecture is read from the records.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from dvae.config import ConfigError, DVAEConfig

log = logging.getLogger(__name__)

# Classes that may appear in OpenAI's encoder.pkl / decoder.pkl; rebuilt as records, never imported.
MODULE_CLASSES = {
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
}
# Plain data the pickle may construct: tensors and containers.
SAFE_GLOBALS = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
}


class UnsafePickleError(ConfigError, pickle.UnpicklingError):
    """The file names a global outside the allowlist; nothing from it was run."""


class _Record:
    """Stands in for a pickled module: keeps its class path and attributes; runs none of its code."""

    class_path = ""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state)

    def __repr__(self):
        return f"<record of {self.class_path}>"


_RECORD_TYPES: dict[str, type] = {}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only MODULE_CLASSES (as records) and SAFE_GLOBALS; everything else is refused."""

    source = "<pickle>"

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 pickles use Python 2 names
        path = f"{module}.{name}"
        if path in SAFE_GLOBALS:
            return SAFE_GLOBALS[path]
        if path in MODULE_CLASSES:
            if path not in _RECORD_TYPES:
                _RECORD_TYPES[path] = type(name, (_Record,), {"class_path": path})
            return _RECORD_TYPES[path]
        raise UnsafePickleError(
            f"{self.source}: refusing to load global '{path}': it is not part of OpenAI's dVAE, so this file is "
            f"not an unmodified encoder.pkl/decoder.pkl; re-download it from OpenAI or convert it yourself")


def _restricted_pickle_module(source: str) -> types.ModuleType:
    """A `pickle_module` for torch.load whose Unpickler (and header `load`) are the restricted one."""
    unpickler = type("RestrictedUnpickler", (RestrictedUnpickler,), {"source": source})
    mod = types.ModuleType("dvae_restricted_pickle")
    mod.Unpickler = unpickler
    mod.load = lambda f, **kw: unpickler(f, **kw).load()
    mod.__name__ = "dvae_restricted_pickle"
    return mod


def load_records(path: str | Path) -> _Record:
    """Unpickle an OpenAI dVAE file into a record tree (see module docstring for what is allowed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; pass the encoder.pkl / decoder.pkl files OpenAI published "
                                f"(https://cdn.openai.com/dall-e/encoder.pkl, .../decoder.pkl), downloaded beforehand")
    log.warning("unpickling %s with a restricted unpickler: only OpenAI dVAE module classes (as inert records), "
                "tensors and containers are allowed; no code from the file runs", path)
    try:
        with warnings.catch_warnings():  # legacy-format files carry module source to compare; records have none
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            root = torch.load(path, map_location="cpu", weights_only=False,
                              pickle_module=_restricted_pickle_module(str(path)))
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated / not a torch file
        raise ConfigError(f"{path}: cannot be read as a torch pickle ({type(e).__name__}: {e}); "
                          f"re-download the file") from None
    if not isinstance(root, _Record):
        raise ConfigError(f"{path}: holds a {type(root).__name__}, not a pickled dall_e Encoder/Decoder module")
    return root


def record_state_dict(record: _Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a record tree like `nn.Module.state_dict` (parameters and buffers, dotted names)."""
    out: dict[str, torch.Tensor] = {}
    for key in ("_parameters", "_buffers"):
        for name, t in (getattr(record, key, None) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach().float().clone()
    for name, child in (getattr(record, "_modules", None) or {}).items():
        if child is not None:
            out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


def _expect(record: _Record, class_path: str, path: Path) -> None:
    if record.class_path != class_path:
        raise ConfigError(f"{path}: holds {record.class_path}, expected {class_path}; did you swap --encoder and --decoder?")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _group_count(record: _Record, path: Path) -> int:
    """OpenAI's classes declare `group_count = 4` as a plain class attribute, not an attrs field, so a pickled
    Encoder/Decoder does not carry it: count the `group_N` stages of its `blocks` instead."""
    blocks = (getattr(record, "_modules", None) or {}).get("blocks")
    groups = [name for name in (getattr(blocks, "_modules", None) or {}) if name.startswith("group_")]
    if not groups:
        raise ConfigError(f"{path}: no blocks.group_N stages in this {record.class_path}; is this OpenAI's dVAE release?")
    return len(groups)


def import_openai_dvae(encoder_pkl: str | Path, decoder_pkl: str | Path, image_size: int = 256):
    """-> (DiscreteVAE with OpenAI's weights, provenance dict). Raises with the file name on any mismatch."""
    from dvae.model import DiscreteVAE

    encoder_pkl, decoder_pkl = Path(encoder_pkl), Path(decoder_pkl)
    enc, dec = load_records(encoder_pkl), load_records(decoder_pkl)
    _expect(enc, "dall_e.encoder.Encoder", encoder_pkl)
    _expect(dec, "dall_e.decoder.Decoder", decoder_pkl)
    enc.group_count, dec.group_count = _group_count(enc, encoder_pkl), _group_count(dec, decoder_pkl)
    for name in ("group_count", "n_hid", "n_blk_per_group", "vocab_size"):
        if getattr(enc, name) != getattr(dec, name):
            raise ConfigError(f"{encoder_pkl} and {decoder_pkl} disagree on {name} ({getattr(enc, name)} vs "
                              f"{getattr(dec, name)}); pass an encoder and decoder from the same release")
    if enc.input_channels != 3 or dec.output_channels != 3:
        raise ConfigError(f"{encoder_pkl}: {enc.input_channels} input / {dec.output_channels} output channels; only RGB is supported")
    cfg = DVAEConfig(image_size=image_size, num_tokens=enc.vocab_size, group_count=enc.group_count,
                     n_hid=enc.n_hid, n_blk_per_group=enc.n_blk_per_group, n_init=dec.n_init)
    model = DiscreteVAE(cfg)
    state = {**{f"encoder.{k}": v for k, v in record_state_dict(enc).items()},
             **{f"decoder.{k}": v for k, v in record_state_dict(dec).items()}}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"{encoder_pkl}, {decoder_pkl}: weights do not map onto dvae.model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); is this OpenAI's dVAE release?")
    model.load_state_dict(state)
    provenance = {"encoder": str(encoder_pkl.resolve()), "decoder": str(decoder_pkl.resolve()),
                  "encoder_sha256": _sha256(encoder_pkl), "decoder_sha256": _sha256(decoder_pkl)}
    return model.eval(), provenance
