"""Launched by tests/test_distributed_data.py under torchrun: each rank reads the first batches of
train/train_dalle.py's own training stream and writes the sample keys it saw to <out>/rank_<R>.json."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "train")]

from train_dalle import token_batches  # noqa: E402

from dalle_ar.config import TrainConfig  # noqa: E402
from dalle_ar.engine import rank, setup_distributed, world_size  # noqa: E402

data, out, num_workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
setup_distributed()
stream = token_batches(TrainConfig(data=data, batch_size=8, num_workers=num_workers))
keys = [k for _ in range(6) for k in next(stream)[2]]
(out / f"rank_{rank()}.json").write_text(json.dumps({"world_size": world_size(), "keys": keys}))
