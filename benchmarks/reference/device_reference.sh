#!/usr/bin/env bash
# The reference studies on one GPU machine, in the background of several device calls (see reference_run.py here).
# Each call copies its carried chunks into $CHUNKS and runs device_reference_join.py; this script, started once with
# `setsid nohup bash device_reference.sh MODEL[:PRESET]... &`, runs one lane per model side by side on the one GPU (small models
# leave most of an H200 idle): each lane waits for its model's GGUF, runs the reference preset on it (no figures),
# writes the stage summary and packs the compact tables (no per-window tables, no parts) into /tmp/R/<model>.tgz for a
# later call to return.  BATCH: windows per pass for every lane (reference_run.py --batch-size).  Expects PYTHONPATH (the wheels and this repository), CALIBDROP_CACHE (models/ and
# data/documents as `calibdrop models fetch` and `data fetch` leave them).  THREADS: CPU threads per lane.
set -u
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/R
lane() {
  local model=${1%%:*} preset=reference name=$1
  [ "$model" != "$1" ] && preset=${1#*:} && name=$model-$preset
  local joined=/tmp/R/join-$name.out
  until python3 "$here/device_reference_join.py" >"$joined" && grep -q "^$model: ready" "$joined"; do sleep 3; done
  echo "$(date +%T) start $name" >>/tmp/R/orchestrator.log
  OMP_NUM_THREADS=${THREADS:-5} python3 "$here/reference_run.py" run "$model" --preset "$preset" --out "/tmp/R/$name" \
    ${BATCH:+--batch-size "$BATCH"} \
    >"/tmp/R/$name.log" 2>&1
  echo "$(date +%T) exit $? $name" >>/tmp/R/orchestrator.log
  python3 "$here/reference_run.py" summary "/tmp/R/$name" --preset "$preset" \
    --out "/tmp/R/$name/reference-$name-h200.json" >>"/tmp/R/$name.log" 2>&1
  cp "/tmp/R/$name.log" "/tmp/R/$name/run.log"
  # the per-window held-out tables come back (the resolution stage can be recomputed from them); leave-one-out's
  # windows, larger, go in a tgz of their own
  if ls /tmp/R/$name/lodo_windows* >/dev/null 2>&1; then
    tar czf "/tmp/R/$name-lodo_windows.tgz.partial" -C /tmp/R $(cd /tmp/R && ls -d $name/lodo_windows*) \
      && mv "/tmp/R/$name-lodo_windows.tgz.partial" "/tmp/R/$name-lodo_windows.tgz"
  fi
  tar czf "/tmp/R/$name.tgz.partial" -C /tmp/R --exclude="$name/parts" --exclude="$name/lodo_windows*" "$name" \
    && mv "/tmp/R/$name.tgz.partial" "/tmp/R/$name.tgz"
}
# LANES=serial: one model after another (a run's stage times are its own); otherwise every lane at once.
if [ "${LANES:-}" = serial ]; then
  for model in "$@"; do lane "$model"; done
else
  for model in "$@"; do lane "$model" & done
  wait
fi
echo "$(date +%T) all done" >>/tmp/R/orchestrator.log
