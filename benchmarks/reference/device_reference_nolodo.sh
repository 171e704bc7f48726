#!/usr/bin/env bash
# Cut MODEL's reference run when it reaches leave-one-distribution-out and resume it without (when device time is short):
# waits for the stage line, stops the run, resumes it from its stage store with --no-lodo and packs /tmp/R/MODEL-nolodo.tgz.
set -u
model=$1
here=$(cd "$(dirname "$0")" && pwd)
until grep -q "^stage .*: lodo_sets" "/tmp/R/$model.log" 2>/dev/null; do sleep 2; done
pkill -f "[r]eference_run.py run $model"
sleep 3
OMP_NUM_THREADS=${THREADS:-8} python3 "$here/reference_run.py" run "$model" --out "/tmp/R/$model" --no-lodo \
  >"/tmp/R/$model-nolodo.log" 2>&1
echo "$(date +%T) exit $? $model --no-lodo" >>/tmp/R/orchestrator.log
python3 "$here/reference_run.py" summary "/tmp/R/$model" --out "/tmp/R/$model/reference-$model-h200.json" \
  >>"/tmp/R/$model-nolodo.log" 2>&1
cp "/tmp/R/$model.log" "/tmp/R/$model/run.log"; cp "/tmp/R/$model-nolodo.log" "/tmp/R/$model/run-nolodo.log"
tar czf "/tmp/R/$model-nolodo.tgz.partial" -C /tmp/R --exclude="$model/parts" --exclude="$model/*windows*" "$model" \
  && mv "/tmp/R/$model-nolodo.tgz.partial" "/tmp/R/$model-nolodo.tgz"
