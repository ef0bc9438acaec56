"""Test setup: CPU only, no network, wandb offline into a temp dir, DeepSpeed without MPI."""

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
