#!/usr/bin/env bash
# Run the GPU benchmarks on a CUDA machine that has torch but not our other dependencies, and write their
# JSON into bench/results/ (or $OUT/results when $OUT is set, e.g. on a lent device machine).
#   here:   bash ../shared/tools/gpu-wheels.sh .whl           # offline wheelhouse (deepspeed, open_clip, ...)
#   there:  bash bench/gpu.sh [train|sample|dvae|largest|all]  # from the project root, with .whl/ carried along
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
case $what in train|all) python3 -m bench.train_throughput --preset base --batch_size 16 \
  --out "$results/train_throughput_base_$gpu.json" ;; esac
case $what in sample|all) python3 -m bench.sample_speed --preset base --device cuda \
  --out "$results/sample_speed_base_$gpu.json" ;; esac
case $what in dvae|all) python3 -m bench.dvae_speed --device cuda --out "$results/dvae_speed_paper_$gpu.json" ;; esac
case $what in largest) python3 -m bench.train_throughput --largest --out "$results/largest_zero3_offload_$gpu.json" ;; esac
