"""Where a step's time goes, for the speed benchmarks' `--profile` options: torch.profiler over some calls, the
device time grouped by kind of work, the share of the wall time the device was busy, and launches per call.

On CUDA the kinds group kernel time (kernels on several streams may overlap, so `busy` can exceed 1 there);
launches count the host's kernel launches and CUDA-graph replays, which say whether a compiled step really
replays one graph (a step that launches hundreds of kernels is bound by the host, not the GPU). On CPU they
group the operators' self time, and there are no launches.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

# (kind, name fragments), first match wins; names are matched lower-cased. Kernel names (cuBLAS/cuDNN/CUTLASS,
# flash, Triton from Inductor) and aten operator names (CPU) both land in a kind.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "flex", "sdpa", "softmax_backward_data")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::linear", "aten::matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm", ("layer_norm", "layernorm")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("copy/comm", ("memcpy", "memset", "nccl", "copy_", "all_reduce", "allreduce", "reduce_scatter", "all_gather",
                   "index_copy", "index_select", "cat")),
)
LAUNCHES = {"kernel": ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"),
            "graph": ("cudaGraphLaunch", "cuGraphLaunch")}


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), "other")


def summarize(events, wall_s: float, calls: int, cuda: bool) -> dict:
    """Profiler events -> per-call seconds by kind, busy share and launches per call. `events` are
    torch.profiler FunctionEvents (or anything with name, device_type, self_cpu_time_total and, on CUDA,
    self_device_time_total, in microseconds)."""
    by_kind: dict[str, float] = {}
    launches = {k: 0 for k in LAUNCHES}
    for e in events:
        on_device = e.device_type != torch.autograd.DeviceType.CPU
        if cuda and not on_device:
            for k, names in LAUNCHES.items():
                launches[k] += e.name in names
            continue
        if not cuda and not e.name.startswith("aten::"):
            continue
        kind = kind_of(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + (e.self_device_time_total if on_device else e.self_cpu_time_total)
    busy = sum(by_kind.values()) / 1e6
    return {"calls": calls, "wall_seconds_per_call": round(wall_s / calls, 6),
            "busy_seconds_per_call": round(busy / calls, 6), "busy_share": round(busy / wall_s, 4) if wall_s else None,
            "seconds_per_call_by_kind": {k: round(v / 1e6 / calls, 6) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "launches_per_call": {k: round(v / calls, 2) for k, v in launches.items()} if cuda else None,
            "note": "under the profiler (its overhead included); kernel time on CUDA, operator self time on CPU"}


class Window:
    """A profiler window opened and closed by hand (e.g. from a sampler's per-token callback)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = torch.profiler.profile(activities=acts)
        self.start_time = None
        self.wall = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.prof.start()
        self.start_time = time.perf_counter()

    def stop(self) -> None:
        self.sync()
        self.wall = time.perf_counter() - self.start_time
        self.prof.stop()

    def summary(self, calls: int) -> dict:
        return summarize(self.prof.events(), self.wall, calls, self.cuda)


def profile_calls(fn: Callable[[], object], calls: int, device: torch.device | str) -> dict:
    """Run fn `calls` times under the profiler and summarize per call."""
    window = Window(device)
    window.start()
    for _ in range(calls):
        fn()
    window.stop()
    return window.summary(calls)


def guarded(profile: Callable[[], dict]) -> dict:
    """A profile, or {"error": ...} where the profiler fails: the timings around it are kept either way (a lent
    GPU's minutes are few)."""
    try:
        return profile()
    except Exception as e:  # noqa: BLE001 - any profiler failure is reported, not raised
        return {"error": f"{type(e).__name__}: {e}"[:300]}
