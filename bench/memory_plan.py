"""Print a DALL-E transformer's parameters, FLOPs and per-GPU memory plan (dalle_ar/model/plan.py), built
on the meta device (nothing is allocated):

  python -m bench.memory_plan --preset paper --world_size 64 --batch_size 1
"""

from __future__ import annotations

import json

from dalle_ar.cli import parse, run_cli
from dalle_ar.config import DalleConfig
from dalle_ar.model.plan import plan


def main(argv=None):
    def extra(p):
        p.add_argument("--world_size", type=int, default=8, help="data-parallel GPUs ZeRO shards over (default: 8)")
        p.add_argument("--batch_size", type=int, default=1, help="micro-batch per GPU (default: 1)")

    args, cfg = parse(__doc__, DalleConfig, extra=extra, argv=argv)
    print(json.dumps(plan(cfg, args.world_size, args.batch_size), indent=2))


if __name__ == "__main__":
    run_cli(main)
