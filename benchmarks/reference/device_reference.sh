#!/usr/bin/env bash
# The reference studies on one GPU machine, in the background of several device calls (see reference_run.py here).
# Each call copies its carried chunks into $CHUNKS and runs device_reference_join.py; this script, started once with
# `setsid nohup bash device_reference.sh MODEL... &`, runs one lane per model side by side on the one GPU (small models
# leave most of an H200 idle): each lane waits for its model's GGUF, runs the reference preset on it (no figures),
# writes the stage summary and packs the compact tables (no per-window tables, no parts) into /tmp/R/<model>.tgz for a
# later call to return.  Expects PYTHONPATH (the wheels and this repository), CALIBDROP_CACHE (models/ and
# data/documents as `calibdrop models fetch` and `data fetch` leave them).  THREADS: CPU threads per lane.
set -u
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/R
lane() {
  local model=$1
  local joined=/tmp/R/join-$model.out
  until python3 "$here/device_reference_join.py" >"$joined" && grep -q "^$model: ready" "$joined"; do sleep 3; done
  echo "$(date +%T) start $model" >>/tmp/R/orchestrator.log
  OMP_NUM_THREADS=${THREADS:-5} python3 "$here/reference_run.py" run "$model" --out "/tmp/R/$model" \
    >"/tmp/R/$model.log" 2>&1
  echo "$(date +%T) exit $? $model" >>/tmp/R/orchestrator.log
  python3 "$here/reference_run.py" summary "/tmp/R/$model" --out "/tmp/R/$model/reference-$model-h200.json" \
    >>"/tmp/R/$model.log" 2>&1
  cp "/tmp/R/$model.log" "/tmp/R/$model/run.log"
  tar czf "/tmp/R/$model.tgz.partial" -C /tmp/R --exclude="$model/parts" --exclude="$model/*windows*" "$model" \
    && mv "/tmp/R/$model.tgz.partial" "/tmp/R/$model.tgz"
}
for model in "$@"; do lane "$model" & done
wait
echo "$(date +%T) all done" >>/tmp/R/orchestrator.log
