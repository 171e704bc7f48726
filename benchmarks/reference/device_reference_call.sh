#!/usr/bin/env bash
# One device call of the reference studies, run from the checkout's root with .gpu/ carried (see device_reference.sh):
#   what it carried: the wheels into /tmp/site, the document tables into /tmp/cache, the sources to /tmp/src;
#   every call: copy the carried GGUF stream chunks (.gpu/stream/xNN) into /tmp/chunks, with START=1 start device_reference.sh
#   in the background once (from a fresh copy of .gpu/src), wait up to WAIT seconds for the studies, print their progress and return each finished study's tables.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site-packages:/tmp/src CALIBDROP_CACHE=/tmp/cache SRC=/tmp/src CHUNKS=/tmp/chunks
# Whatever a call carried is put in place: wheels, document tables, sources (one call cannot carry them all with the tree).
# The wheels go to a folder named site-packages: dill treats a module outside one as not installed, and datasets'
# fingerprinting then fails with "Can't pickle <class 'MonthDayNano'>".
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages .gpu/whl/*.whl || exit 1
  python3 -c "import torch, transformers, datasets, gguf, pyarrow, numpy; print(torch.__version__, transformers.__version__, \
datasets.__version__, pyarrow.__version__, numpy.__version__, torch.cuda.get_device_name())" || exit 1
fi
[ -d .gpu/src ] && { rm -rf /tmp/src && cp -r .gpu/src /tmp/src; }
if [ -f .gpu/docs.tar.xz ]; then
  mkdir -p /tmp/cache/data && tar xJf .gpu/docs.tar.xz -C /tmp/cache/data || exit 1
  python3 -c "from analysis.data.documents import load_distribution; print('general docs', len(load_distribution('general')))" || exit 1
fi
mkdir -p "$CHUNKS" /tmp/R
for f in .gpu/stream/x*; do
  [ -f "$f" ] || continue
  n=${f##*/x}
  [ -f "$CHUNKS/$n" ] || { cp "$f" "$CHUNKS/.$n" && mv "$CHUNKS/.$n" "$CHUNKS/$n"; }
done
echo "chunks: $(ls "$CHUNKS" | tr '\n' ' ')"
if [ ! -f /tmp/R/started ] && [ "${START:-0}" = 1 ]; then
  touch /tmp/R/started
  setsid nohup bash "$SRC/benchmarks/reference/device_reference.sh" \
    ${MODELS:-smollm2-135m qwen2.5-coder-0.5b gemma3-270m} \
    >/tmp/R/orchestrator.out 2>&1 </dev/null &
fi
end=$((SECONDS + ${WAIT:-0}))
while [ $SECONDS -lt $end ] && ! grep -q "all done" /tmp/R/orchestrator.log 2>/dev/null; do sleep 5; done
cat /tmp/R/orchestrator.log /tmp/R/orchestrator.out 2>/dev/null
for log in /tmp/R/*.log; do [ "$log" = /tmp/R/orchestrator.log ] || { echo "== $log"; tail -n 3 "$log"; }; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
for t in /tmp/R/*.tgz; do [ -f "$t" ] && [ ! -f "$t.sent" ] && cp "$t" "$OUT/" && touch "$t.sent"; done
true
