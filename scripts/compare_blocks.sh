#!/usr/bin/env bash
# Block and depth variants of the char Shakespeare LM at the same wall time (issue 20):
# pre-norm, post-norm (longer warm-up), the simplified block, universal depth with ACT.
#   bash scripts/compare_blocks.sh MINUTES [OUT_DIR]
# Two trainings at a time, each with one thread on its own core (taskset), so the pair shares
# nothing but memory bandwidth; each variant's cosine ends at its own step count, which a
# 40-step probe sizes to MINUTES. Then `tfx eval --split valid` of each (best checkpoint).
set -euo pipefail
minutes=${1:?minutes}
out=${2:-runs/blocks}
recipe=recipes/lm/shakespeare-char.toml
tfx=${TFX:-.venv/bin/tfx}
declare -A variants=(
  [pre]=""
  [post]="--set model.norm_position=\"post\" --set train.schedule.warmup=400"
  [simplified]="--set model.block=\"simplified\""
  [universal]="--set model.depth.kind=\"universal\" --set model.n_layers=1 --set model.depth.max_steps=4"
)
order=(pre post simplified universal)
mkdir -p "$out"

steps_for() {  # steps that fill $minutes at the probe's speed (one thread)
  local name=$1 probe="$out/probe-$1"
  rm -rf "$probe"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 taskset -c "$2" "$tfx" train "$recipe" --out "$probe" ${variants[$name]} --set train.threads=1 \
    --set train.steps=40 --set train.eval_every=0 --set train.save_every=0 --set train.log_every=10 >/dev/null 2>&1
  python3 - "$probe/metrics.jsonl" "$minutes" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
speed = sorted(r["tokens_per_s"] for r in rows[1:])[len(rows[1:]) // 2]
print(int(speed * 60 * float(sys.argv[2]) / (16 * 128) * 0.95))
EOF
}

run() {  # name core
  local name=$1 core=$2 steps
  steps=$(steps_for "$name" "$core")
  rm -rf "${out:?}/$name"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 taskset -c "$core" "$tfx" train "$recipe" --out "$out/$name" ${variants[$name]} \
    --set train.threads=1 --set train.steps="$steps" --set train.max_minutes="$minutes" > "$out/$name.log" 2>&1
  OMP_NUM_THREADS=1 taskset -c "$core" "$tfx" eval "$out/$name" --split valid --json > "$out/$name.json"
}

for ((i = 0; i < ${#order[@]}; i += 2)); do
  run "${order[i]}" 0 & run "${order[i+1]}" 1 & wait
done
python3 - "$out" "${order[@]}" <<'EOF'
import json, re, sys
out = sys.argv[1]
print(f"{'variant':<12} {'steps':>6} {'tok/s':>8} {'valid loss':>10} {'params':>9}  depth")
for name in sys.argv[2:]:
    result = json.load(open(f"{out}/{name}.json"))
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    speed = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    steps = max(r["step"] for r in rows)
    depth = result.get("depth", {}).get("mean_steps", "")
    params = re.search(r"with ([\d,]+) parameters", open(f"{out}/{name}.log").read())
    print(f"{name:<12} {steps:>6} {speed[len(speed) // 2]:>8.0f} {result['loss']:>10.4f} "
          f"{params.group(1) if params else '?':>9}  {depth}")
EOF
