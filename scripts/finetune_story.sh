#!/usr/bin/env bash
# Fine-tuning from a run (issue 22): the Shakespeare subword LM continued on the Bible's English side,
# against the same model trained from scratch on the Bible for the same steps, bits per byte and
# perplexity on both test sets (bits per byte compares models with different tokenizers).
#   bash scripts/finetune_story.sh [STEPS] [OUT]
# 1. recipes/lm/shakespeare-bpe.toml as shipped (reused if OUT/shakespeare exists);
# 2. OUT/bible-ft: init_from that run (its tokenizer and every tensor), STEPS steps on
#    data/bible-de-en/train.en at a third of the recipe's learning rate, a short warm-up;
# 3. OUT/bible-scratch: the same recipe and STEPS from a fresh start (its own BPE on the Bible);
# then `tfx eval --data` of each (and of the Shakespeare model: "before") on both test texts.
set -euo pipefail
steps=${1:-600}
out=${2:-runs/finetune}
tfx=${TFX:-.venv/bin/tfx}
recipe=recipes/lm/shakespeare-bpe.toml
"$tfx" data get shakespeare >/dev/null
"$tfx" data get bible-de-en >/dev/null
mkdir -p "$out/bible-en"
for split in train valid test; do  # an lm reads .txt: the English side as plain text files
  cp data/bible-de-en/$split.en "$out/bible-en/$split.txt"
done
bible=(--set "data.corpus=''" --set data.train="$out/bible-en/train.txt" --set data.valid="$out/bible-en/valid.txt"
       --set data.test="$out/bible-en/test.txt" --set train.steps="$steps" --set train.eval_every=200
       --set train.save_every=0)
[ -f "$out/shakespeare/best.safetensors" ] || "$tfx" train "$recipe" --set train.save_every=0 --out "$out/shakespeare" 2> "$out/shakespeare.log"
[ -f "$out/bible-ft/best.safetensors" ] || "$tfx" train "$recipe" "${bible[@]}" --set init_from="'$out/shakespeare'" \
  --set train.optimizer.lr=3.3e-4 --set train.schedule.warmup=50 --set train.schedule.min_lr=3.3e-5 --out "$out/bible-ft" 2> "$out/bible-ft.log"
[ -f "$out/bible-scratch/best.safetensors" ] || "$tfx" train "$recipe" "${bible[@]}" --out "$out/bible-scratch" 2> "$out/bible-scratch.log"
printf '%-16s %-12s %10s %10s %8s\n' run "test text" "bits/byte" perplexity tokens
for run in shakespeare bible-ft bible-scratch; do
  for text in data/shakespeare/test.txt "$out/bible-en/test.txt"; do
    "$tfx" eval "$out/$run" --data "$text" --json | python3 -c "
import json, sys
r = json.load(sys.stdin)
print(f\"{sys.argv[1]:<16} {sys.argv[2]:<12} {r['bits_per_byte']:>10.4f} {r['perplexity']:>10.3f} {r['tokens']:>8,}\")" "$run" "$(basename "$(dirname "$text")")"
  done
done
grep -h "train.max_minutes\|model with" "$out"/*.log || true
