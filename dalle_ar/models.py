"""The export registry, keyed on an export's `kind` (the "kind" of its config.json): for each kind, how to build
the model from that config, how to write the config for a model, and what one training step of it is (an example
batch of the shapes its trainer feeds, and the loss its trainer minimises). open_clip's factory, by export kind.

    model, config = models.load("runs/dalle/export", device="cuda")      # any export directory, one call
    config = models.export_config("dalle", model, dvae="runs/dvae/export")  # what a trainer writes
    step = models.train_step(model, config, batch_size=32)                  # one forward + backward (FLOP counting)

Kinds and the trainer that writes them: dvae (train/train_dvae.py, train/convert_openai_dvae.py), dalle
(train/train_dalle.py), clip (train/train_clip.py), unclip_prior (train/train_prior.py), unclip_decoder
(train/train_decoder.py, base decoder and upsampler). config.json keys are the exported format: existing exports
load as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from dalle_ar.checkpoint import WEIGHTS, load_pretrained
from dalle_ar.config import (ClipConfig, ConfigError, DalleConfig, DiffusionConfig, DVAEConfig, DVAELossConfig, PriorConfig,
                             UnetConfig, config_diff, load_json)


@dataclass(frozen=True)
class Kind:
    """One export kind. `build(config)` -> an untrained model of that config; `export_config(model, **extra)` ->
    the config.json dict (extra: provenance such as the dVAE or CLIP it was trained with); `example_batch(model,
    config, batch_size, generator)` -> inputs of the shapes its trainer feeds (values do not change the FLOPs);
    `loss(model, config, batch)` -> the scalar its trainer minimises."""
    build: Callable[[dict], nn.Module]
    export_config: Callable[..., dict]
    example_batch: Callable[[nn.Module, dict, int, torch.Generator], tuple]
    loss: Callable[[nn.Module, dict, tuple], torch.Tensor]


# -- dvae ------------------------------------------------------------------------------------------

def _build_dvae(config: dict) -> nn.Module:
    from dvae import DiscreteVAE

    return DiscreteVAE(DVAEConfig(**config["dvae"]))


def _dvae_loss(model, config, batch):
    from dvae.loss import dvae_loss

    # step 0 of a 1000-step schedule: the KL weight and temperature change no FLOPs
    return dvae_loss(model, batch[0], 0, DVAELossConfig(**config.get("loss", {})).scaled(1000))[0]


DVAE = Kind(
    build=_build_dvae,
    export_config=lambda model, **extra: {"kind": "dvae", "dvae": asdict(model.config), **extra},
    example_batch=lambda model, config, b, g: (torch.rand(b, 3, model.config.image_size, model.config.image_size,
                                                          generator=g),),
    loss=_dvae_loss,
)

# -- dalle: the transformer ---------------------------------------------------------------------------

def _build_dalle(config: dict) -> nn.Module:
    from dalle_ar.model import DalleTransformer

    return DalleTransformer(DalleConfig(**config["model"]))


def _dalle_batch(model, config, b, g):
    c = model.config
    return (torch.randint(0, c.num_text_tokens, (b, c.text_len), generator=g),
            torch.randint(0, c.num_image_tokens, (b, c.image_seq_len), generator=g))


DALLE = Kind(
    build=_build_dalle,
    export_config=lambda model, **extra: {"kind": "dalle", "model": asdict(model.config), **extra},
    example_batch=_dalle_batch,
    loss=lambda model, config, batch: model.loss(*batch)[0],  # caption dropout lives in the model's loss
)

# -- clip -------------------------------------------------------------------------------------------

def _build_clip(config: dict) -> nn.Module:
    from dalle_ar.clip import build_clip

    return build_clip(ClipConfig(**config["clip"]))


def _clip_export_config(cfg: ClipConfig, **extra) -> dict:
    # an open_clip model does not carry our ClipConfig, so this kind's export config is written from the config
    from dalle_ar.clip import clip_export_config

    return {**clip_export_config(cfg), **extra}


def _clip_batch(model, config, b, g):
    from dalle_ar.clip import clip_tokenizer

    cfg = ClipConfig(**config["clip"])
    images = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=g)
    return images, clip_tokenizer(cfg)(["a small red circle"] * b)


def _clip_loss(model, config, batch):
    from dalle_ar.clip import contrastive_loss, normalize_images

    images, tokens = batch
    return contrastive_loss(model, normalize_images(model, images), tokens)[0]


CLIP = Kind(build=_build_clip, export_config=_clip_export_config, example_batch=_clip_batch, loss=_clip_loss)

# -- unclip_prior, unclip_decoder ---------------------------------------------------------------------

def _build_prior(config: dict) -> nn.Module:
    from dalle_ar.unclip.prior import build_prior

    return build_prior(config)


def _prior_batch(model, config, b, g):
    c = model.config
    return (torch.randint(0, c.text_vocab_size, (b, c.text_len), generator=g),
            torch.randn(b, c.embed_dim, generator=g), torch.randn(b, c.embed_dim, generator=g))


PRIOR = Kind(
    build=_build_prior,
    export_config=lambda model, **extra: model.export_config(**extra),
    example_batch=_prior_batch,
    loss=lambda model, config, batch: model.loss(*batch)[0],  # (text, text embedding, image embedding)
)


def _build_decoder(config: dict) -> nn.Module:
    from dalle_ar.unclip.decoder import build_decoder

    return build_decoder(config)


def _decoder_batch(model, config, b, g):
    c = model.config
    return (torch.rand(b, 3, c.image_size, c.image_size, generator=g), torch.randn(b, max(c.embed_dim, 1), generator=g),
            torch.randint(0, c.text_vocab_size, (b, c.text_len), generator=g))


def _decoder_loss(model, config, batch):
    images, zi, text = batch
    c = model.config  # an upsampler sees no embedding; a base decoder its caption only with use_caption
    return model.loss(images, zi if c.embed_dim else None, text if c.use_caption else None)[0]


DECODER = Kind(
    build=_build_decoder,
    export_config=lambda model, **extra: model.export_config(**extra),
    example_batch=_decoder_batch,
    loss=_decoder_loss,
)

KINDS: dict[str, Kind] = {"dvae": DVAE, "dalle": DALLE, "clip": CLIP, "unclip_prior": PRIOR, "unclip_decoder": DECODER}


# -- the calls --------------------------------------------------------------------------------------

def kind_of(config: dict, source: str = "config.json") -> Kind:
    kind = config.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{source}: unknown export kind {kind!r} (config.json 'kind'); one of {', '.join(KINDS)}")
    return KINDS[kind]


def build(config: dict) -> nn.Module:
    """An untrained model of an export config (its `kind` says which)."""
    return kind_of(config).build(config)


def export_config(kind: str, model, **extra) -> dict:
    """The config.json a trainer writes for `model` (for kind clip: its ClipConfig)."""
    return kind_of({"kind": kind}).export_config(model, **extra)


def load(path: str | Path, device: str | torch.device = "cpu", kind: str | None = None,
         allow_pickle: bool = False) -> tuple[nn.Module, dict]:
    """Any export directory -> (model in eval mode on `device`, its config.json). With `kind`, an export of
    another kind is refused (e.g. a dVAE passed where a transformer is expected)."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():  # load_pretrained names what is missing (the weights or config.json) before building
        return load_pretrained(path, KINDS[kind or "dalle"].build, str(device), allow_pickle=allow_pickle)
    config = load_json(config_path)
    if kind is not None and config.get("kind", kind) != kind:
        raise ConfigError(f"{config_path}: a {config.get('kind')} export, expected {kind}; pass a {kind} export directory")
    # exports written before kinds existed (and tests' hand-made ones) carry none: the caller's `kind` decides
    entry = KINDS[kind] if kind is not None and "kind" not in config else kind_of(config, str(config_path))
    return load_pretrained(path, entry.build, str(device), allow_pickle=allow_pickle)


def train_step(model: nn.Module, config: dict, batch_size: int,
               device: str | torch.device = "cpu") -> Callable[[], None]:
    """One training step's forward + backward of `model` (kind from `config`), on an example batch of
    `batch_size` drawn from a fixed generator. The weights are never updated (no optimizer)."""
    entry = kind_of(config)
    model = model.to(device).train()
    batch = [x.to(device) for x in entry.example_batch(model, config, batch_size, torch.Generator().manual_seed(0))]

    def step():
        model.zero_grad(set_to_none=True)
        entry.loss(model, config, batch).backward()

    return step


# Which config.json section holds which config dataclass (the export format), and the trainer of each kind.
SECTIONS = {"dvae": DVAEConfig, "loss": DVAELossConfig, "model": DalleConfig, "clip": ClipConfig, "prior": PriorConfig,
            "unet": UnetConfig, "diffusion": DiffusionConfig}
TRAINERS = {"dvae": "train/train_dvae.py", "dalle": "train/train_dalle.py", "clip": "train/train_clip.py",
            "unclip_prior": "train/train_prior.py", "unclip_decoder": "train/train_decoder.py"}


def _export_config(path: str | Path) -> tuple[Path, dict]:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"--init_from {path}: no config.json there; pass an export directory a trainer wrote "
                          f"(<out>/export)")
    return config_path, load_json(config_path)


def export_sections(path: str | Path) -> dict[type, dict]:
    """An export's config.json as {config dataclass: its values}: what a trainer started --init_from it builds
    unless the command line says otherwise."""
    _, config = _export_config(path)
    return {cls: config[key] for key, cls in SECTIONS.items() if isinstance(config.get(key), dict)}


def init_from(model: nn.Module, path: str | Path, export_config: dict) -> None:
    """Copy the weights of export `path` into `model`, a fresh model whose export config is `export_config` (a
    trainer's --init_from: weights only; the optimizer, schedule and step start over). The export must be of the
    same kind and every parameter of the same shape; otherwise a ConfigError names the first difference and the fix."""
    from safetensors.torch import load_file

    config_path, config = _export_config(path)
    kind, theirs = export_config.get("kind"), config.get("kind")
    if kind is not None and theirs != kind:
        raise ConfigError(f"--init_from {path}: a {theirs} export (kind in {config_path}), but this trainer trains "
                          f"{kind}; pass the export directory of a {kind} run ({TRAINERS.get(kind, kind)} --out DIR "
                          f"writes DIR/export)")
    if not (Path(path) / WEIGHTS).is_file():
        raise FileNotFoundError(f"--init_from {path}: no {WEIGHTS}; pass an export directory a trainer wrote")
    state, own = load_file(str(Path(path) / WEIGHTS)), model.state_dict()
    differs = config_diff({k: v for k, v in config.items() if k in SECTIONS},
                          {k: v for k, v in export_config.items() if k in SECTIONS})
    fix = (f"use the same --preset/model flags as the export (see {config_path}"
           + (f"; differs: {', '.join(differs[:4])}" if differs else "") + ")")
    for name, tensor in own.items():
        if name not in state:
            raise ConfigError(f"--init_from {path}: the export has no {name} (this model has {len(own)} tensors, the "
                              f"export {len(state)}); {fix}")
        if state[name].shape != tensor.shape:
            raise ConfigError(f"--init_from {path}: {name} is {tuple(state[name].shape)} in the export but "
                              f"{tuple(tensor.shape)} here; {fix}")
    extra = sorted(state.keys() - own.keys())
    if extra:
        raise ConfigError(f"--init_from {path}: the export's {extra[0]} has no place in this model; {fix}")
    model.load_state_dict(state)


def write_dry_run(path: str | Path, config: dict, batch_size: int, grad_accum: int) -> None:
    """A trainer's --dry_run: the export config it would train, with the micro-batch and accumulation of one
    optimizer step, so a planner can build the model here and count one step (train/train_matched.py)."""
    from dalle_ar.config import save_json

    save_json(path, {"export_config": config, "batch_size": batch_size, "grad_accum": grad_accum})


DRY_RUN_HELP = ("write the export config this command would train, with its batch size and gradient accumulation, "
                "to PATH (JSON) and exit without training")
