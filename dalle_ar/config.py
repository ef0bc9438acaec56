"""Configs: one dataclass per concern, presets, and JSON load/save.

Each dataclass validates its own values in `__post_init__` (a bad value is one error, naming the field and
the fix, wherever the config comes from). Turning the dataclasses into command-line flags, and the
`--config` / preset / ds_config.json layering, lives in `dalle_ar/cli.py`.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from dvae.config import ConfigError, DVAEConfig, DVAELossConfig


class DataError(ValueError):
    """The data is too broken to go on (too many skipped samples, no readable shard); the message says
    how to find the bad files (`train/validate_shards.py`)."""


class SaveError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the message names the checkpoint that resumes."""


ATTENTION_MASKS = ("full", "row", "column", "conv")
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Offload = Literal["none", "cpu", "nvme"]


@dataclass
class DalleConfig:
    """Decoder-only transformer over [text tokens | image tokens] (DALL-E section 2.2)."""

    text_vocab_size: int = 512      # BPE vocabulary (without the per-position pad tokens)
    text_len: int = 16              # paper: 256
    num_image_tokens: int = 512     # dVAE codebook size, paper: 8192
    image_fmap_size: int = 8        # dVAE grid side, paper: 32
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    text_loss_weight: float = 1 / 8  # paper: 1/8 text, 7/8 image
    # Attention mask per layer (model/attention.py has the exact rules): "full" (dense causal), "sparse"
    # (the paper's schedule, appendix B.1), or one of full|row|column|conv per layer, comma-separated.
    attention: str = "full"
    attention_backend: Literal["sdpa", "flex"] = "sdpa"  # sdpa: dense boolean masks; flex: FlexAttention block-sparse masks
    rotary: bool = False             # rotary embeddings on q, k over all slots, on top of the learned positions
    sandwich_norm: bool = False      # LayerNorm at the end of each attention/MLP branch too (CogView)
    null_cond_prob: float = 0.0      # caption dropout: train on the all-pad caption with this probability

    def __post_init__(self):
        _ = self.layer_attention  # raises on a bad `attention`
        if self.attention_backend not in ("sdpa", "flex"):
            raise ConfigError(f"attention_backend: {self.attention_backend!r} is not one of 'sdpa', 'flex'")
        if self.attention_backend == "flex" and self.dropout:
            raise ConfigError("attention_backend: 'flex' has no attention dropout; use dropout=0 or 'sdpa'")
        if self.rotary and (self.dim // self.heads) % 2:
            raise ConfigError(f"rotary: needs an even head dim, got dim {self.dim} / heads {self.heads}")
        if not 0.0 <= self.null_cond_prob < 1.0:
            raise ConfigError(f"null_cond_prob: {self.null_cond_prob} is not in [0, 1)")

    @property
    def layer_attention(self) -> list[str]:
        """One mask per layer. "sparse" is the paper's: with 1-based layer index i, column attention when
        (i - 2) % 4 == 0, row otherwise ("row, column, row, row, ..."), and conv in the last layer."""
        spec = self.attention.replace(" ", "")
        if spec == "sparse":
            return ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, self.depth)] + ["conv"]
        kinds = [spec] * self.depth if spec in ATTENTION_MASKS else spec.split(",")
        bad = sorted(set(kinds) - set(ATTENTION_MASKS))
        if bad or len(kinds) != self.depth:
            raise ConfigError(f"attention: {self.attention!r} must be 'sparse' or one of {'|'.join(ATTENTION_MASKS)}, "
                              f"alone or as a comma list with one entry per layer ({self.depth})"
                              + (f"; unknown {bad}" if bad else f"; got {len(kinds)} entries"))
        return kinds

    @property
    def image_seq_len(self) -> int:
        return self.image_fmap_size ** 2

    @property
    def num_text_tokens(self) -> int:
        """BPE vocabulary plus one distinct pad token per text position (paper section 2.2)."""
        return self.text_vocab_size + self.text_len

    @property
    def text_slots(self) -> int:
        """Slots before the first image token: BOS and the text_len caption tokens (model/transformer.py)."""
        return self.text_len + 1

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_seq_len


@dataclass
class ClipConfig:
    """A small open_clip model trained on our shards (for rerank and metrics)."""

    image_size: int = 64
    embed_dim: int = 128
    vision_layers: int = 3
    vision_width: int = 192
    patch_size: int = 8
    context_length: int = 32
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    # Patch positions: learned (open_clip's default) or fixed 2D sine-cosine, which a small CLIP trained briefly
    # needs to tell left from right (shapes world, 300 steps: position 98% vs 52% learned)
    vision_pos_embed: Literal["learnable", "sin_cos_2d"] = "learnable"

    def open_clip_dict(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                           "width": self.vision_width, "patch_size": self.patch_size,
                           "pos_embed_type": self.vision_pos_embed},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
        }


@dataclass
class TrainConfig:
    """What every trainer shares. DeepSpeed-only settings (ZeRO details, offload, buckets) live in
    `ds_config`. The fields that overlap it (batch, accumulation, stage, clipping) take the JSON's value
    unless a flag, --config or the preset sets them (`cli.DS_CONFIG_KEYS`); the engine writes the result.
    The JSON is read once (`ds_json`) and carried with the config."""

    data: str = "data/shapes"       # directory of .tar shards, a glob, or a brace pattern
    out: str = "runs/run"
    steps: int = 1000                # optimizer steps
    batch_size: int = 32             # micro-batch per GPU/process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    lr_schedule: Literal["cosine", "plateau"] = "cosine"  # cosine after warmup; plateau: halve on each plateau (paper transformer)
    plateau_patience: int = 1000     # plateau: steps without a relative improvement of plateau_threshold
    plateau_threshold: float = 0.01
    plateau_halvings: int = 5        # paper: five halvings, ending at lr / 32
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.96
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: Precision = "auto"    # auto: bf16 on CUDA, fp32 on CPU; fp16: dynamic loss scaling, CUDA
    # fp16 only: a dynamic gradient scale per residual branch (paper appendix D; model/grad_scale.py), starting
    # at 2**initial_scale_power and doubling every loss_scale_window clean steps (ds_config's fp16 section)
    resblock_grad_scaling: bool = False
    ds_config: str = "ds_config.json"  # DeepSpeed JSON (default: ./ds_config.json, else the copy in the package)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500            # also saved at the end; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True              # continue from <out>/checkpoints/latest when it exists
    num_workers: int = 0
    wandb: Literal["offline", "online", "disabled"] = "offline"  # wandb mode (offline: synced later with `wandb sync`)
    wandb_project: str = "dalle-ar"
    wandb_name: str = ""             # run name (default: <trainer>-<out directory name>)
    wandb_entity: str = ""           # team or user (default: wandb's)
    progress: bool = True            # tqdm bar on rank 0
    offload: Offload = "none"        # ZeRO offload of optimizer state (and parameters at stage 3)
    nvme_path: str = ""              # with --offload nvme: a local NVMe directory
    activation_checkpointing: bool = False  # recompute block activations in backward (models that support it)
    ema_decay: float = 0.0           # exponential moving average of the weights, exported instead of them; 0 = off
    sample_every: int = 0            # write sample / reconstruction grids every N steps (0 = only at the end)
    max_skip_fraction: float = 0.01  # stop when more than this fraction of samples read was skipped as bad data
    max_nonfinite: int = 10          # NaN/Inf losses are skipped and counted; stop after this many in a row
    compile: bool = False            # torch.compile the model (in place: parameter names and checkpoints unchanged)
    # Start from the weights of an export directory (<out>/export of a run of the same kind): fresh optimizer,
    # LR schedule and step 0; the model's config comes from its config.json unless given. A resume ignores it.
    init_from: str = ""
    fused_adamw: bool = True         # torch's fused AdamW kernel (CUDA: one launch for all parameters; CPU: one pass, 7x)
    # adamw: every parameter. muon: DeepSpeed's Muon (momentum orthogonalised by Newton-Schulz) on the model's
    # hidden weight matrices (its `muon_params()`), AdamW at --lr on the rest (embeddings, heads, norms, biases)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # DeepSpeed's muon_update runs torch.compile'd with dynamic shapes: one graph per kind of matrix (tall or wide, small
    # or large), not one per shape (DeepSpeed's own compiled eight for the dVAE, 8.6 s more on a first run, and would
    # run eagerly past torch.compile's recompile limit). --no-muon_compile runs it eagerly: on the CPU the demo's
    # transformer steps as fast without it and skips 12-19 s of compiling; the dVAE's 38 kernels step 5 ms slower
    # eagerly (docs/demo.md).
    muon_compile: bool = True

    PRECISIONS: ClassVar[tuple[str, ...]] = get_args(Precision)
    OFFLOADS: ClassVar[tuple[str, ...]] = get_args(Offload)

    def __post_init__(self):
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"max_skip_fraction: {self.max_skip_fraction} is not in [0, 1]")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= 1")
        # Whether this machine runs fp16 is the engine's check (engine/ds_config.py: compute_dtype).
        if self.precision not in self.PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {', '.join(self.PRECISIONS)}")
        if self.resblock_grad_scaling and self.precision != "fp16":
            raise ConfigError(f"--resblock_grad_scaling is for --precision fp16 (got {self.precision}): bf16 and fp32 "
                              f"have fp32's exponent range and need no gradient scaling; drop the flag or pass "
                              f"--precision fp16")
        if self.offload not in self.OFFLOADS:
            raise ConfigError(f"offload={self.offload!r}: use one of {', '.join(self.OFFLOADS)}")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError("--offload needs ZeRO (--zero_stage 1, 2 or 3)")
        if self.offload == "nvme" and not self.nvme_path:
            raise ConfigError("--offload nvme needs --nvme_path /local/fast/disk")
        if self.lr_schedule not in ("cosine", "plateau"):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}: use cosine or plateau")
        if self.ema_decay and self.zero_stage == 3:
            raise ConfigError(f"--ema_decay {self.ema_decay} needs full parameters on every rank, which ZeRO 3 shards: pass "
                              "--zero_stage 0, 1 or 2, or --ema_decay 0 (no EMA weights)")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer={self.optimizer!r}: use adamw or muon")
        if self.optimizer == "muon":
            if self.zero_stage == 3 or self.offload != "none":
                fix = " and ".join(f for f, bad in (("pass --zero_stage 0, 1 or 2", self.zero_stage == 3),
                                                     ("drop --offload", self.offload != "none")) if bad)
                raise ConfigError("--optimizer muon runs at ZeRO stage 0, 1 or 2 without offload (DeepSpeed orthogonalises "
                                  f"each matrix where its gradient is reduced): {fix}, or use --optimizer adamw")
            if self.zero_stage in (1, 2) and self.grad_clip > 0:
                raise ConfigError(f"--optimizer muon at ZeRO stage {self.zero_stage} needs --grad_clip 0: DeepSpeed measures "
                                  f"the norm after orthogonalising, so a clip of {self.grad_clip} would shrink every update; "
                                  f"pass --grad_clip 0 (Muon's updates have a fixed size) or --zero_stage 0")

    @functools.cached_property
    def ds_json(self) -> dict:
        """The `ds_config` file's contents, read once: `cli.resolve` hands over the copy it read for the
        overlapping fields (assigning fills this cache); a config built in code reads the file on first use."""
        return load_json(ds_config_path(self.ds_config))


# The DeepSpeed JSON shipped inside the package: a copy of the repository's ds_config.json (a test keeps them equal).
PACKAGED_DS_CONFIG = Path(__file__).parent / "ds_config.json"


def ds_config_path(path: str | Path) -> Path:
    """The DeepSpeed JSON a run reads: `path`; for the default name when the working directory has no such file, the
    copy in the package, so the scripts and the `dalle-ar` command run from any directory."""
    if str(path) == TrainConfig.ds_config and not Path(path).exists():
        return PACKAGED_DS_CONFIG
    return Path(path)


@dataclass
class SampleConfig:
    """Sampling and rerank (paper section 2.3 / 3: N candidates per caption, keep the CLIP top k)."""

    num_candidates: int = 16
    top_k_rerank: int = 4
    temperature: float = 1.0
    # A token count: sample among the k most likely image tokens; 0 = off (a probability mass is --top_p)
    top_k: int = 0
    # Nucleus sampling: among the fewest tokens whose probabilities sum to p (e.g. 0.9); 0 = off
    top_p: float = 0.0
    batch_size: int = 64
    seed: int = 0                    # same seed, batch_size and device -> same images
    cond_scale: float = 1.0          # classifier-free guidance: uncond + s * (cond - uncond); 1 = off
    rank_by: Literal["clip", "likelihood"] = "clip"  # likelihood: the transformer's own log p(image | caption)
    prime_rows: int = 0              # with --prime-image: keep this many top rows of its codes, sample the rest
    inpaint_box: str = ""            # "x0,y0,x1,y1" region to regenerate: grid cells, or fractions in [0, 1]
    inpaint_border: int = 0          # regenerate a border this many grid cells wide
    compile: bool = False            # torch.compile the decode step (CUDA graphs on CUDA)
    # --backend unclip (DDIM steps on the respaced schedule; guidance is classifier-free, 1 = off)
    prior_steps: int = 64
    decoder_steps: int = 64
    prior_guidance: float = 1.0
    decoder_guidance: float = 3.0

    def __post_init__(self):
        if self.rank_by not in ("clip", "likelihood"):
            raise ConfigError(f"rank_by: {self.rank_by!r} is not one of 'clip', 'likelihood'")
        if self.top_k_rerank > self.num_candidates:
            raise ConfigError(f"top_k_rerank: {self.top_k_rerank} > num_candidates {self.num_candidates}; keep at most N")


@dataclass
class DiffusionConfig:
    """Gaussian diffusion of the unCLIP prior / decoder (dalle_ar/unclip/diffusion.py)."""

    timesteps: int = 1000            # training steps of the forward process (sampling respaces them)
    schedule: Literal["cosine", "linear"] = "cosine"  # cosine (improved DDPM) or linear (DDPM)
    target: Literal["eps", "x0", "v"] = "eps"  # what the network predicts (the prior script defaults to x0, the decoder to v)


@dataclass
class PriorConfig:
    """unCLIP diffusion prior (Ramesh et al. 2022, section 2.1): a causal transformer over
    [caption tokens, CLIP text embedding, timestep, noised CLIP image embedding, query] -> image embedding."""

    embed_dim: int = 128             # CLIP embedding width (set from the embedding shards)
    text_len: int = 16               # caption BPE slots (project tokenizer)
    text_vocab_size: int = 512       # BPE vocabulary (set from the tokenizer)
    dim: int = 256
    depth: int = 4
    heads: int = 4
    # Unit-norm CLIP embeddings times sqrt(embed_dim): each coordinate then has unit variance, the scale the
    # noise schedule assumes (dalle2-pytorch does the same); 0 = sqrt(embed_dim).
    embed_scale: float = 0.0
    text_drop_prob: float = 0.1      # caption + text embedding dropped this often (classifier-free guidance)

    @property
    def scale(self) -> float:
        return self.embed_scale or self.embed_dim ** 0.5


@dataclass
class UnetConfig:
    """unCLIP decoder / upsampler: an ADM U-Net (Dhariwal & Nichol 2021) conditioned on the CLIP image
    embedding (added to the timestep embedding + `clip_tokens` extra attention tokens) and optionally the
    caption; with low_res_size > 0 it is an upsampler conditioned on a blurred low-resolution image."""

    image_size: int = 32             # paper: 64 (decoder), 256 (upsampler)
    channels: int = 64               # width of the first level
    channel_mult: str = "1,2,2"      # width multiplier per level; the resolution halves between levels
    num_res_blocks: int = 2
    attention_resolutions: str = "8"  # feature-map sides with self-attention (+ context tokens)
    head_channels: int = 32
    # Where a pixel is, told to its attention layers: "none" (ADM/GLIDE: only the convolutions' zero padding says it)
    # or a fixed 2D sine-cosine table added to each attention layer's normalised input, so that a caption's "top
    # left" can select pixels
    attention_pos_embed: Literal["none", "sin_cos_2d"] = "none"
    dropout: float = 0.0
    embed_dim: int = 128             # CLIP image embedding width (0 = unconditional, e.g. the upsampler)
    clip_tokens: int = 4             # extra context tokens projected from the image embedding (paper: 4)
    use_caption: bool = False        # also attend to the caption's BPE tokens (GLIDE-style)
    text_len: int = 16
    text_vocab_size: int = 512
    image_embed_drop: float = 0.1    # paper: CLIP embedding zeroed 10% of the time
    caption_drop: float = 0.5        # paper: caption dropped 50% of the time
    low_res_size: int = 0            # > 0: upsampler from this size, the low-res image is concatenated to the input
    blur_sigma_max: float = 0.6      # upsampler training: Gaussian blur of the conditioning, sigma ~ U(0.4, max)
    # Upsampler: diffuse the difference between the image and its low-res input resized bilinearly (SRDiff, Li et al.
    # 2022) instead of the image itself (the paper's), so flat regions start right and only edges are generated
    low_res_residual: bool = False

    @property
    def mults(self) -> list[int]:
        return [int(m) for m in str(self.channel_mult).split(",") if m.strip()]

    @property
    def attention_sides(self) -> list[int]:
        return [int(r) for r in str(self.attention_resolutions).split(",") if r.strip()]


PRESETS: dict[str, dict[type, dict[str, Any]]] = {
    # CPU tests and the demo: 64px images -> 8x8 grid over 512 codes.
    "tiny": {
        DVAEConfig: dict(image_size=64, num_tokens=512, group_count=4, n_hid=16, n_blk_per_group=1, n_init=128,
                         straight_through=True),
        # The synthetic world's flat colours make the logit-Laplace likelihood collapse the codebook (README,
        # "dVAE"), so the tiny preset trains with MSE + the codebook entropy penalty; anneals span the run.
        DVAELossConfig: dict(reconstruction="mse", kl_weight=0.0, entropy_weight=1e-2, entropy_cell_weight=0.1,
                             reference_steps=1000, kl_anneal_steps=100, temperature_anneal_steps=1000,
                             lr_anneal_steps=1000),
        DalleConfig: dict(text_len=16, num_image_tokens=512, image_fmap_size=8, dim=256, depth=4, heads=4),
        ClipConfig: dict(image_size=64, vision_pos_embed="sin_cos_2d"),
        PriorConfig: dict(dim=128, depth=2, heads=4),
        UnetConfig: dict(image_size=32, channels=32, channel_mult="1,2,2", num_res_blocks=1, attention_resolutions="8"),
    },
    # The paper's data shapes (256 text slots, 32x32 over 8192 codes) and sparse schedule at smaller sizes;
    # `python -m bench.memory_plan --preset NAME` prints parameters, FLOPs and a memory plan.
    # ~450M parameters (454M; 24 layers at this width would be 353M).
    "base": {
        DalleConfig: dict(text_vocab_size=16384, text_len=256, num_image_tokens=8192, image_fmap_size=32,
                          dim=1024, depth=32, heads=16, attention="sparse"),
    },
    # ~1.3B parameters (1.31B).
    "large": {
        DalleConfig: dict(text_vocab_size=16384, text_len=256, num_image_tokens=8192, image_fmap_size=32,
                          dim=2048, depth=24, heads=16, attention="sparse"),
    },
    # The paper: 256px -> 32x32 over 8192 codes; 12B transformer (64 layers, 62 heads of 64, d=3968).
    "paper": {
        DVAEConfig: dict(image_size=256, num_tokens=8192, group_count=4, n_hid=256, n_blk_per_group=2, n_init=128),
        DalleConfig: dict(text_vocab_size=16384, text_len=256, num_image_tokens=8192, image_fmap_size=32,
                          dim=3968, depth=64, heads=62, attention="sparse"),
        ClipConfig: dict(image_size=224, embed_dim=512, vision_layers=12, vision_width=768, patch_size=16,
                         context_length=77, text_width=512, text_heads=8, text_layers=12),
        # unCLIP (DALL-E 2 appendix C): ~1B decoder-only prior (24 layers of width 2048), GLIDE-sized ADM decoder at 64px.
        PriorConfig: dict(text_len=256, text_vocab_size=16384, embed_dim=512, dim=2048, depth=24, heads=32),
        UnetConfig: dict(image_size=64, channels=512, channel_mult="1,2,3,4", num_res_blocks=3,
                         attention_resolutions="32,16,8", head_channels=64, embed_dim=512, use_caption=True,
                         text_len=256, text_vocab_size=16384),
    },
}


def preset(cls: type, name: str, **overrides):
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return cls(**{**PRESETS[name].get(cls, {}), **overrides})


def to_dict(cfg) -> dict:
    return asdict(cfg)


def _checked(cls: type, name: str, value, source: str):
    """`value` for field `name`, type-checked: JSON gives "100" or 1e3 where an int is meant, and a
    dataclass would keep it until something far away breaks. ints are accepted for floats."""
    t = typing.get_type_hints(cls).get(name)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(t)
    if typing.get_origin(t) is Literal:
        if value not in get_args(t):
            raise ConfigError(f"{source}: {name} must be one of {', '.join(map(repr, get_args(t)))}, got {value!r}")
        return value
    if ok is None:
        return value
    if not ok(value):
        raise ConfigError(f"{source}: {name} must be {t.__name__}, got {value!r} ({type(value).__name__}); "
                          f"write it like the default, {getattr(cls, name, None)!r}")
    return float(value) if t is float else value


def from_dict(cls: type, data: dict, source: str = "config"):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(known)}")
    return cls(**{k: _checked(cls, k, v, source) for k, v in data.items()})


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """'model.dim 256 vs 512' for every value that differs between two (nested) config dicts."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} {x!r} vs {y!r}")
    return out


def save_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found; pass an existing JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file") from None
