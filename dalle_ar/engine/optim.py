"""The client optimizer's parameter groups: DeepSpeed gets a torch AdamW whose weight decay skips the
parameters decay would only pull towards zero."""

from __future__ import annotations

import torch.nn as nn

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices and conv kernels only: not on embeddings (token, position),
    norm gains, biases or other vectors (e.g. BOS), which decay would pull towards zero for no benefit."""
    skip = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in skip]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2 or id(p) in skip], "weight_decay": 0.0}]
