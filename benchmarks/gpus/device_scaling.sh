#!/usr/bin/env bash
# 1 -> 2 -> 4 GPU data-parallel scoring of config-built 7B and 13B shapes in one device call.
# Run from a folder holding src/ (this repository's analysis, benchmarks, data_manifests), cache/
# (data/documents of general and math, tokenizer/) and whl/; results and logs go to $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD/src CALIBDROP_CACHE=$PWD/cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 1
log=$OUT/scaling.log
{ nvidia-smi --query-gpu=index,name,memory.total --format=csv; nvidia-smi topo -m; nproc; } >>"$log" 2>&1
script=src/benchmarks/gpus/multi_gpu_scaling.py
common="--distributions general,math --tokenizer cache/tokenizer"
for config in ${CONFIGS:-llama-7b llama-13b}; do
  runs=""
  for n in 1 2 4; do
    devices=$(seq -s, 0 $((n - 1)))
    echo "== $config $n GPU(s) $(date +%T)" >>"$log"
    if [ "$n" = 1 ]; then launch="python3"; else launch="python3 -m torch.distributed.run --standalone --nproc_per_node $n"; fi
    CUDA_VISIBLE_DEVICES=$devices timeout 240 $launch $script run --config "$config" $common --out "R/$config-g$n" 2>&1 \
      | grep -v -e UserWarning -e 'return func' -e 'Guessing device' >>"$log"
    runs="$runs R/$config-g$n"
  done
  python3 $script compare $runs --out "$OUT/scaling-$config.json" >/dev/null 2>>"$log"
  echo "== $config compared $(date +%T)" >>"$log"
done
