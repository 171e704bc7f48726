#!/usr/bin/env bash
# One device call of the paper-preset run (paper_preset_run.py here), resumed from state/results.tgz when present.
# Run from a folder holding src/ (this repository's analysis, benchmarks, data_manifests), cache/tokenizer,
# docs.tar.xz (the five distributions' document tables and sidecars), whl/ and optionally state/results.tgz.part-*
# (the results folder as the last call packed it).
# Usage: CALL=c1 LIMIT=550 bash src/benchmarks/runs/device_paper_preset.sh;
# logs, the stage summary and the packed results folder go to $OUT (copy the parts into state/ for the next call).
# What comes back is at most 16 MiB a file and what travels at most 64 MiB, so the results folder is packed in
# 15 MiB parts without what the next call rebuilds anyway: figures and report, scores.per_sample (2 s from the
# saved proxy and ablation tables) and, once their three stages are saved, the per-distribution score parts.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD/src CALIBDROP_CACHE=$PWD/cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 1
python3 -c "import tarfile; tarfile.open('docs.tar.xz').extractall('cache/data/documents', filter='data')" || exit 1
mkdir -p R && if compgen -G "state/results.tgz.part-*" >/dev/null; then cat state/results.tgz.part-* | tar xzf - -C R; fi
script=src/benchmarks/runs/paper_preset_run.py
timeout "${LIMIT:-550}" python3 $script run --config llama-7b --tokenizer cache/tokenizer --checkpoint /tmp/llama7b \
  --out R/paper --no-tasks --call "$CALL" >"$OUT/paper-$CALL.log" 2>&1
rc=$?
if [ "$rc" = 124 ]; then
  python3 -c "import json, sys, time; open('R/paper/paper_preset_events.jsonl', 'a').write(json.dumps({'call': sys.argv[1], 'time': time.time(), 'stage': None, 'message': 'stopped by timeout', 'peak_memory_bytes_before': None}) + '\n')" "$CALL"
fi
echo "exit $rc" >>"$OUT/paper-$CALL.log"
skip=(--exclude=paper/figures --exclude=paper/report.md --exclude=paper/report.html)
[ -f R/paper/scores.proxies.parquet ] && [ -f R/paper/scores.ablation.parquet ] && skip+=(--exclude=paper/scores.per_sample.parquet --exclude=paper/scores.per_sample.json)
[ -f R/paper/scores.proxies.parquet ] && [ -f R/paper/scores.ablation.parquet ] && [ -f R/paper/subsets.per_sample.parquet ] && skip+=(--exclude=paper/parts/scores)
tar czf - -C R "${skip[@]}" paper | split -b 15m - "$OUT/results.tgz.part-"
python3 $script summary R/paper --out "$OUT/paper-summary.json" >/dev/null
