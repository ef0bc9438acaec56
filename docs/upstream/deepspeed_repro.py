"""Reproduces three bugs of DeepSpeed 0.19.7, with torch and deepspeed alone, on a CPU (one process, gloo).

    python docs/upstream/deepspeed_repro.py            # prints one JSON object; exit status 0 either way
    python docs/upstream/deepspeed_repro.py --patched  # then 1 and 3 again with dalle_ar's fixes applied

1. ZeRO stage 1/2 keeps the momentum of only the last Muon matrix of a rank's partition. Two hidden matrices trained
   three steps with momentum 0.95 at ZeRO 2 should end where ZeRO 0 ends (the same Muon on the same gradient); the
   first matrix ends where momentum 0 ends instead.
2. `muon_update` on a convolution kernel (out, in, k, k), which Muon's docstring says it handles by viewing it as a
   matrix, raises for a 3x3 kernel and returns an (out, in, out, in) tensor for a 1x1 one.
3. Gradient clipping at ZeRO stage 0 in fp32 raises for a 0-dim parameter (open_clip's `logit_scale`).

See deepspeed.md beside this file for the report.
"""

import json
import os
import socket
import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")
with socket.socket() as free:  # a port nothing else on the machine listens on
    free.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free.getsockname()[1]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.runtime.zero.muon import original_muon  # noqa: E402


def train(stage: int, momentum: float) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 16, bias=False))
    for p in model.parameters():
        p.use_muon = True
    config = {"train_batch_size": 8, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
              "optimizer": {"type": "Muon", "params": {"lr": 0.02, "momentum": momentum, "weight_decay": 0.0}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 16, generator=gen)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    return [p.detach().clone() for p in model.parameters()]


def zero2_momentum() -> dict:
    ref, no_momentum, zero2 = train(0, 0.95), train(0, 0.0), train(2, 0.95)
    gap = lambda a, b: [round((x - y).abs().max().item(), 6) for x, y in zip(a, b)]
    to_ref, to_no_momentum = gap(zero2, ref), gap(zero2, no_momentum)
    effect = gap(ref, no_momentum)  # what the momentum does to each matrix in three steps
    # a matrix that lost its momentum ends ten times nearer to momentum 0 than to ZeRO 0
    lost = [m < d / 10 for d, m in zip(to_ref, to_no_momentum)]
    return {"present": any(lost), "matrices_that_lost_their_momentum": [i for i, x in enumerate(lost) if x],
            "max_abs_gap_zero2_to_zero0": to_ref, "max_abs_gap_zero2_to_momentum_0": to_no_momentum,
            "max_abs_effect_of_momentum": effect}


def conv_kernels() -> dict:
    update = getattr(original_muon.muon_update, "_torchdynamo_orig_callable", original_muon.muon_update)
    out = {}
    for shape in ((8, 4, 3, 3), (8, 4, 1, 1)):
        grad = torch.randn(shape)
        try:
            out[str(shape)] = str(tuple(update(grad.clone(), torch.zeros(shape), beta=0.95, ns_method="standard").shape))
        except RuntimeError as error:
            out[str(shape)] = f"RuntimeError: {str(error).splitlines()[0]}"
    return {"present": any(v != shape for shape, v in out.items()), "muon_update_returns": out}


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))  # 0-dim, as open_clip's CLIP has it

    def forward(self, x):
        return (self.lin(x) * self.logit_scale.exp()).pow(2).mean()


def zero0_clip_0dim() -> dict:
    torch.manual_seed(0)
    model = Scaled()
    config = {"train_batch_size": 4, "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.backward(engine(torch.randn(4, 4)))
    try:
        engine.step()
    except RuntimeError as error:
        return {"present": True, "step": f"RuntimeError: {str(error).splitlines()[0]}"}
    return {"present": False, "step": "ok"}


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    report = {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
              "zero2_keeps_only_the_last_matrix_momentum": zero2_momentum(),
              "muon_update_on_conv_kernels": conv_kernels(),
              "zero0_clip_on_a_0_dim_parameter": zero0_clip_0dim()}
    if "--patched" in sys.argv:  # dalle_ar.engine.optim's fixes of 1 and 3
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
        from dalle_ar.engine.optim import deepspeed_clips_zero_dim_gradients, zero_muon_keeps_every_momentum

        zero_muon_keeps_every_momentum()
        report["zero2_with_dalle_ar_fix"] = zero2_momentum()
        deepspeed_clips_zero_dim_gradients()
        report["zero0_clip_with_dalle_ar_fix"] = zero0_clip_0dim()
    print(json.dumps(report))
