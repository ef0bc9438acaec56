"""Two real processes (torchrun, gloo on CPU) read the transformer's training stream: each rank gets its
own samples, and the same launch reads the same samples again (what step-exact resume relies on)."""

import json

import numpy as np
import pytest
from conftest import run_script

from dalle_ar.data import synthetic, write
from dalle_ar.engine import free_port


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    write.write_token_shards(((f"{i:09d}", rng.integers(0, 512, (8, 8)), synthetic.make_example(i)[1])
                               for i in range(128)), d, samples_per_shard=16)
    return d


def launch(data, out, workers):
    out.mkdir()
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "tests/probes/rank_keys.py", str(data), str(out), str(workers))
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_different_samples_and_the_same_ones_again(token_shards, tmp_path, workers):
    first = launch(token_shards, tmp_path / "a", workers)
    assert [r["world_size"] for r in first] == [2, 2]
    k0, k1 = first[0]["keys"], first[1]["keys"]
    assert len(k0) == len(k1) == 48
    # resampled shards: a rank may draw a sample the other also drew, but the streams are not the same
    # stream, and most of what each rank sees the other does not
    assert k0 != k1 and len(set(k0) & set(k1)) < len(set(k0)) / 2
    again = launch(token_shards, tmp_path / "b", workers)
    assert [r["keys"] for r in again] == [k0, k1]
