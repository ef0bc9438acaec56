"""Test setup: CPU only, no network, wandb offline into a temp dir, DeepSpeed without MPI."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# before anything imports wandb or deepspeed
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="dalle-ar-wandb-"))
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = "1"
# `make test` runs the files on pytest-xdist workers, one per core: each worker's torch, and the scripts it starts, get
# their share of the cores (two workers of two threads each on two cores spin against each other: the dVAE overfit
# test takes 20 s alone and 70-97 s so)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def script_env() -> dict:
    """Environment for a script subprocess: without this process's rendezvous variables."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script (`train/x.py ...`) or module (`-m torch.distributed.run ...`) and fail loudly."""
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """A small synthetic shard set (300 images over 3 shards), shared by the tests that read data."""
    from dalle_ar.data import synthetic, write

    out = tmp_path_factory.mktemp("shapes")
    write.write_image_shards(((f"{i:09d}", *synthetic.make_example(i)) for i in range(300)), out, samples_per_shard=100)
    return out


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    """Token shards (random 8x8 codes over 512, shapes-world captions) in <dir>/tokens and a BPE in <dir>/tok, as
    train/encode.py and train/train_tokenizer.py would leave them."""
    import numpy as np

    from dalle_ar.data import synthetic, write
    from dalle_ar.text import TextTokenizer, train_bpe

    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    examples = [(f"{i:09d}", rng.integers(0, 512, (8, 8)), synthetic.make_example(i)[1]) for i in range(96)]
    write.write_token_shards(examples, d / "tokens", samples_per_shard=32)
    TextTokenizer(train_bpe([c for _, _, c in examples], vocab_size=300), 16).save(d / "tok" / "tokenizer.json")
    return d


def tiny_exports(d: Path, vocab_size: int = 120, text_len: int = 12, image_fmap_size: int = 4) -> dict:
    """Untrained tiny exports in `d`, built in a second: a dVAE (32 px, 4x4 codes over 32) and a DALL-E transformer
    with their BPE, two different CLIPs (clip, eval_clip), an unCLIP prior and decoder (16 px) on the first CLIP.
    Returns their export directories by name (and "dir"). The default BPE (byte-level, 120 asked) truncates most
    captions to `text_len`; vocab_size=400, text_len=16 reads every shapes-world caption whole. The dVAE codes a
    32 px image as 16x16: image_fmap_size=16 makes the transformer's grid agree (for priming from an image)."""
    import torch

    from dalle_ar.checkpoint import save_pretrained
    from dalle_ar.clip import build_clip, clip_export_config, export_files
    from dalle_ar.config import ClipConfig, DalleConfig, DiffusionConfig, PriorConfig, UnetConfig
    from dalle_ar.data import synthetic
    from dalle_ar.model import DalleTransformer
    from dalle_ar.text import TextTokenizer, train_bpe
    from dalle_ar.unclip.decoder import UnetDecoder
    from dalle_ar.unclip.prior import DiffusionPrior
    from dvae import DiscreteVAE
    from dvae.config import DVAEConfig

    def export(model, run_dir, config, extra=None, steps=5, batch_size=2, world_size=1):
        """An export plus the train_config.json a trainer writes beside it (for the FLOP accounting)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps({"steps": steps, "batch_size": batch_size, "grad_accum": 1,
                                                               "world_size": world_size}))
        return save_pretrained(model, run_dir / "export", config, extra)

    torch.manual_seed(0)
    tok = TextTokenizer(train_bpe([synthetic.make_example(i)[1] for i in range(200)], vocab_size=vocab_size), text_len)
    tok.save(d / "tokenizer.json")
    dvae_cfg = DVAEConfig(image_size=32, num_tokens=32, group_count=2, n_hid=8, n_blk_per_group=1, n_init=8)
    dvae = export(DiscreteVAE(dvae_cfg), d / "dvae", {"kind": "dvae", "dvae": dvae_cfg.__dict__,
                                                      "loss": {"reconstruction": "mse", "kl_weight": 0.0}})
    dalle_cfg = DalleConfig(text_vocab_size=tok.vocab_size, text_len=text_len, num_image_tokens=32, image_fmap_size=image_fmap_size,
                            dim=32, depth=1, heads=2)
    dalle = export(DalleTransformer(dalle_cfg), d / "dalle", {"kind": "dalle", "dvae": str(dvae), "model": dalle_cfg.__dict__},
                   {"tokenizer.json": str(d / "tokenizer.json")}, world_size=2)  # as if trained on two ranks
    clips = {}
    for name, seed, patch in (("clip", 0, 16), ("eval_clip", 1, 8)):  # another seed and architecture
        torch.manual_seed(seed)
        cfg = ClipConfig(image_size=32, embed_dim=16, vision_layers=1, vision_width=64, patch_size=patch,
                         context_length=16, text_width=32, text_heads=2, text_layers=1)
        clips[name] = export(build_clip(cfg), d / name, clip_export_config(cfg), export_files(cfg, d / f"{name}_oc"))
    prior = DiffusionPrior(PriorConfig(embed_dim=16, text_len=text_len, text_vocab_size=tok.vocab_size, dim=32, depth=1, heads=2),
                           DiffusionConfig(target="x0"))
    prior_dir = export(prior, d / "prior", prior.export_config(clip=str(clips["clip"])),
                       {"tokenizer.json": str(d / "tokenizer.json")})
    decoder = UnetDecoder(UnetConfig(image_size=16, channels=8, channel_mult="1,2", num_res_blocks=1,
                                     attention_resolutions="8", head_channels=8, embed_dim=16), DiffusionConfig())
    decoder_dir = export(decoder, d / "decoder", decoder.export_config(stage="base", clip=str(clips["clip"])))
    return {"dir": d, "dvae": dvae, "dalle": dalle, "prior": prior_dir, "decoder": decoder_dir, **clips}


@pytest.fixture
def deepspeed_newton_schulz(monkeypatch):
    """DeepSpeed's Muon module with its own (bf16 / fp16) Newton-Schulz iterations, put back after the test:
    `--optimizer muon` on CPU puts the fp32 ones in their place for the rest of the process."""
    from deepspeed.runtime.zero.muon import original_muon

    from dalle_ar.engine.optim import gram_newton_schulz, newton_schulz

    assert original_muon.zeropower_via_newtonschulz5 is not newton_schulz, "a test left the fp32 iteration in place"
    assert original_muon.zeropower_via_gram_newtonschulz is not gram_newton_schulz, "a test left the fp32 iteration"
    for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
        monkeypatch.setattr(original_muon, name, getattr(original_muon, name))
    return original_muon
