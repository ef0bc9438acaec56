"""Training machinery applied to a DalleTransformer from outside (torchtitan's rule: the model file is
single-device code; checkpointing, precision tricks and compilation are put on by whoever trains it).

- `apply_activation_checkpointing(model)`: every block recomputes its activations in backward
  (torch's composable `checkpoint`: pre/post-forward hooks, so module structure and parameter names --
  and with them state_dicts, exports and checkpoints -- do not change).
- `apply_resblock_grad_scaling(model, ...) -> ResblockGradScaler`: the fp16 per-resblock gradient scaler
  (model/grad_scale.py, paper appendix D) as forward hooks around each residual branch and gradient
  hooks on its parameters. Hooks act only when autograd records (training forwards); no-grad forwards
  (evaluation, sampling, the KV-cache decode step) are the plain model's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed._composable import checkpoint

from dalle_ar.model.grad_scale import ResblockGradScaler
from dalle_ar.model.transformer import Block, DalleTransformer


def apply_activation_checkpointing(model: DalleTransformer) -> DalleTransformer:
    """Recompute each block's activations in backward instead of storing them (in place; returns model)."""
    for block in model.blocks:
        checkpoint(block)
    return model


def activation_checkpointed(model: DalleTransformer) -> bool:
    return all(checkpoint.state(block) is not None for block in model.blocks)


def branches(block: Block) -> tuple[tuple[nn.Module, nn.Module, list[nn.Parameter]], ...]:
    """The block's two residual branches ("resblocks"): (first module, last module, parameters) each."""
    return ((block.ln_1, block.ln_attn_out,
             [*block.ln_1.parameters(), *block.attn.parameters(), *block.ln_attn_out.parameters()]),
            (block.ln_2, block.ln_mlp_out,
             [*block.ln_2.parameters(), *block.mlp.parameters(), *block.ln_mlp_out.parameters()]))


def apply_resblock_grad_scaling(model: DalleTransformer, **kwargs) -> ResblockGradScaler:
    """fp16 training: a gradient scale per residual branch. The residual stream (the identity path) is kept
    in fp32: it is cast on entering the first block; each branch reads a compute-dtype cast of it
    (`scaler.enter`) and its output is cast back (`scaler.exit`). Returns the scaler: its state is the
    trainer's to step, save and restore; `kwargs` go to ResblockGradScaler."""
    scaler = ResblockGradScaler(2 * len(model.blocks), **kwargs)

    def to_fp32(module, args):
        if torch.is_grad_enabled():
            return (args[0].float(), *args[1:])

    def enter(i):
        def hook(module, args):
            if torch.is_grad_enabled():
                return (scaler.enter(args[0], i, module.weight.dtype), *args[1:])
        return hook

    def exit(i):
        def hook(module, args, out):
            if torch.is_grad_enabled():
                return scaler.exit(out, i)
        return hook

    # prepend: the cast comes before activation checkpointing's hook, which then stores the fp32 input
    model.blocks[0].register_forward_pre_hook(to_fp32, prepend=True)
    for layer, block in enumerate(model.blocks):
        for j, (first, last, params) in enumerate(branches(block)):
            i = 2 * layer + j
            first.register_forward_pre_hook(enter(i))
            last.register_forward_hook(exit(i))
            scaler.hook_branch_params(params, i)
    embeddings = (model.text_emb, model.text_pos, model.image_emb, model.image_row, model.image_col)
    scaler.hook_skip_params([model.bos, *(m.weight for m in embeddings)])
    return scaler
