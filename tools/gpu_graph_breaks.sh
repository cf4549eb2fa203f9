#!/usr/bin/env bash
# Graph breaks of the compiled layers of one bench model on the GPU (dynamo's graph_breaks log, one
# unprofiled step): tools/gpu_graph_breaks.sh [bench args ...]; the log goes to $OUT/graph_breaks.log.
set -u
OUT=${OUT:-/tmp/r1mega-out}
mkdir -p "$OUT"
TORCH_LOGS=graph_breaks timeout ${GB_TIMEOUT:-150} python3 -m r1mega.cli bench "$@" --compile layer --skip-hf \
  --steps 1 --warmup 1 >"$OUT/graph_breaks.log" 2>&1
echo "graph-break run rc=$?"
grep -c "Graph break" "$OUT/graph_breaks.log" | sed 's/^/graph breaks logged: /'
grep -A6 "Graph break" "$OUT/graph_breaks.log" | grep -v "^--$" | sort | uniq -c | sort -rn | head -30
