"""The one training engine: every trainer (dVAE, transformer, CLIP, unCLIP) runs through `Trainer`.

It owns everything parallelism- and bookkeeping-related, so model code never imports DeepSpeed (nor
wandb): only the modules of this package do. In torchtitan's shape, one concern per module:

- `distributed.py`  process-group setup, rank / world size, the collectives that keep ranks agreeing
- `ds_config.py`    compute dtype and the resolved DeepSpeed config (ds_config.json + the run's values)
- `optim.py`        AdamW parameter groups (no weight decay on embeddings, norms, biases)
- `schedules.py`    warmup + cosine, and the paper's plateau halving
- `ema.py`          the exported exponential moving average of the weights
- `rng.py`          the random streams, checkpointed and restored after the data fast-forward
- `checkpointer.py` one checkpointer over every component with `state_dict`/`load_state_dict`; atomic
                    saves, `latest`, pruning, consolidated fp32 exports
- `signals.py`      clean stops on SIGTERM/SIGINT at any point, and the crash tests' fault points
- `lock.py`         one live run per output directory (`<out>/run.lock`)
- `logger.py`       metrics.jsonl and wandb on rank 0
- `trainer.py`      `Trainer`: composes the above into the step-counted training loop
"""

from dalle_ar.engine.checkpointer import COMPLETE, Checkpointer, StateFns
from dalle_ar.engine.distributed import any_rank, barrier, free_port, mean_over_ranks, rank, setup_distributed, world_size
from dalle_ar.engine.ds_config import build_ds_config, compute_dtype, fp16_supported
from dalle_ar.engine.ema import EMA
from dalle_ar.engine.optim import param_groups
from dalle_ar.engine.rng import RNGStreams, rng_state, set_rng_state
from dalle_ar.engine.schedules import PlateauHalving, lr_factor, warmup, warmup_cosine
from dalle_ar.engine.signals import FAULT_ENV, StopSignal, Stopped, fault_point
from dalle_ar.engine.trainer import LossFn, Trainer, to_device

__all__ = ["COMPLETE", "Checkpointer", "EMA", "FAULT_ENV", "LossFn", "PlateauHalving", "RNGStreams", "StateFns",
           "StopSignal", "Stopped", "Trainer", "any_rank", "barrier", "build_ds_config", "compute_dtype",
           "fault_point", "fp16_supported", "free_port", "lr_factor", "mean_over_ranks", "param_groups", "rank",
           "rng_state", "set_rng_state", "setup_distributed", "to_device", "warmup", "warmup_cosine", "world_size"]
