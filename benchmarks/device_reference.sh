#!/usr/bin/env bash
# The reference studies on one GPU machine, in the background of several device calls (see benchmarks/reference_run.py).
# Each call copies its carried chunks into $CHUNKS and runs device_reference_join.py; this script, started once with
# `setsid nohup bash device_reference.sh MODEL... &`, waits for each model's GGUF, runs the reference preset on it
# (no figures), writes the stage summary and packs the compact tables (no held-out windows, no parts) into
# /tmp/R/<model>.tgz for a later call to return.  Expects PYTHONPATH (the wheels and this repository),
# CALIBDROP_CACHE (models/ and data/documents as `calibdrop models fetch` and `data fetch` leave them) and SRC.
set -u
mkdir -p /tmp/R
for model in "$@"; do
  until python3 "$SRC/benchmarks/device_reference_join.py" >/tmp/R/join.out && grep -q "^$model: ready" /tmp/R/join.out; do sleep 3; done
  echo "$(date +%T) start $model" >>/tmp/R/orchestrator.log
  python3 "$SRC/benchmarks/reference_run.py" run "$model" --out "/tmp/R/$model" >"/tmp/R/$model.log" 2>&1
  echo "$(date +%T) exit $? $model" >>/tmp/R/orchestrator.log
  python3 "$SRC/benchmarks/reference_run.py" summary "/tmp/R/$model" --out "/tmp/R/$model/reference-$model-h200.json" >>"/tmp/R/$model.log" 2>&1
  cp "/tmp/R/$model.log" "/tmp/R/$model/run.log"
  tar czf "/tmp/R/$model.tgz.partial" -C /tmp/R --exclude="$model/parts" --exclude="$model/heldout_windows.*" "$model" \
    && mv "/tmp/R/$model.tgz.partial" "/tmp/R/$model.tgz"
done
echo "$(date +%T) all done" >>/tmp/R/orchestrator.log
