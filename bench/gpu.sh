#!/usr/bin/env bash
# Run the GPU benchmarks on a CUDA machine that has torch but not our other dependencies, and write their
# JSON into bench/results/ (or $OUT/results when $OUT is set, e.g. on a lent device machine).
#   here:   bash ../shared/tools/gpu-wheels.sh .whl           # offline wheelhouse (deepspeed, open_clip, ...)
#   there:  bash bench/gpu.sh [train|train-more|sample|dvae|fp16|profile|largest|largest-more|all]
# from the project root, with .whl/ carried along. Each part fits a 10-minute call (the lent machines' limit);
# the train and largest parts rewrite their JSON after every variant / rung, so a cut-off run keeps its numbers.
#   train         base at seq 1280, ZeRO-2, bf16: flex_compile, full_compile, sdpa, unfused_adamw (MFU, memory)
#   train-more    flex (eager BlockMask), fp16, fp16_resblock (the cost of per-resblock gradient scaling)
#   sample        sampling speed of base: batch 1 / 8 / 64, eager vs compiled, against the bandwidth floor
#   dvae          paper-size dVAE encode/decode throughput
#   fp16          gradient fidelity of fp16 with one loss scale vs per-resblock scales, on the GPU
#   largest       ZeRO-3 + CPU offload ladder rungs 0-2 (1.2B, 2.5B, 4.5B); largest-more: rungs 3-5 (7B-12B)
#   profile       where the time goes: base's training step (flash + compile, dense-mask SDPA) by kind of kernel and
#                 the GPU's busy share; the compiled decode step at batch 8 and 1 (kernel launches and CUDA-graph
#                 replays per token, with torch.compile's recompile and cudagraph-skip messages in the log)
set -euo pipefail
what=${1:-all}
results=${OUT:+$OUT/results}
results=${results:-bench/results}
mkdir -p "$results"
if ! python3 -c "import deepspeed, open_clip, webdataset, wandb" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} WANDB_MODE=disabled
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
free -g | head -2 || true
case $what in train|all) python3 -m bench.train_throughput --preset base --batch_size 16 \
  --variants flex_compile,full_compile,sdpa,unfused_adamw --timeout 240 \
  --out "$results/train_throughput_base_$gpu.json" ;; esac
case $what in train-more|all) python3 -m bench.train_throughput --preset base --batch_size 16 \
  --variants flex,fp16,fp16_resblock --timeout 240 --out "$results/train_throughput_base_more_$gpu.json" ;; esac
case $what in sample|all) python3 -m bench.sample_speed --preset base --device cuda \
  --out "$results/sample_speed_base_$gpu.json" ;; esac
case $what in dvae|all) python3 -m bench.dvae_speed --device cuda --out "$results/dvae_speed_paper_$gpu.json" ;; esac
case $what in fp16|all) python3 -m bench.fp16_grad_scaling --depth 24 --dim 512 --batch_size 16 \
  --out "$results/fp16_grad_scaling_$gpu.json" ;; esac
case $what in profile) python3 -m bench.train_throughput --preset base --batch_size 16 --variants full_compile,sdpa \
  --steps 3 --warmup 2 --profile_steps 2 --timeout 200 --out "$results/train_profile_base_$gpu.json"
  TORCH_LOGS=recompiles,perf_hints python3 -m bench.sample_speed --preset base --device cuda --variants compiled \
  --batch-sizes 8,1 --repeats 1 --profile-tokens 16 --out "$results/sample_profile_base_$gpu.json" ;; esac
case $what in largest) python3 -m bench.train_throughput --largest --rungs 0,1,2 --timeout 280 \
  --out "$results/largest_zero3_offload_$gpu.json" ;; esac
case $what in largest-more) python3 -m bench.train_throughput --largest --rungs 3,4,5 --timeout 280 \
  --out "$results/largest_zero3_offload_more_$gpu.json" ;; esac
