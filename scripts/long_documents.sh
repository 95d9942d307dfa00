#!/usr/bin/env bash
# Long documents: whole movie reviews (~750 words) classified at context 1,024 with local windows
# ([CLS] pooled, which then sees only its window; and mean pooled), Longformer (window + global [CLS])
# and BigBird, against dense attention truncated to 256 and 512 tokens and dense at 1,024, all for the
# same training time, one after another (tfx compare), plus TF-IDF + logistic regression. Test
# accuracy of each run's best-on-valid checkpoint, tokens/s, then each one's valid accuracy.
#   bash scripts/long_documents.sh [MINUTES=5] [OUT=runs/compare/long-documents] [SEED=0]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-5}
OUT=${2:-runs/compare/long-documents}
SEED=${3:-0}
TFX=".venv/bin/python -m tfx"
$TFX data get movie-reviews >/dev/null
$TFX compare recipes/classifier/movie-reviews-long.toml --minutes "$MINUTES" --split test --out "$OUT" \
    --set train.seed="$SEED" \
    --variant 'dense-256:model.attention={kind="dense"},model.context=256' \
    --variant 'dense-512:model.attention={kind="dense"},model.context=512' \
    --variant 'dense-1024:' \
    --variant 'local-1024:model.attention={kind="local",window=128}' \
    --variant 'local-1024-mean:model.attention={kind="local",window=128},model.pool="mean"' \
    --variant 'longformer-1024:model.attention={kind="longformer",window=128,global_tokens=[0]}' \
    --variant 'bigbird-1024:model.attention={kind="bigbird",block=64,window_blocks=3,global_blocks=1,random_blocks=2}'
for run in "$OUT"/*/; do
    [ -f "$run/recipe.toml" ] || continue
    printf '%s\tvalid %s\n' "$(basename "$run")" \
        "$($TFX eval "$run" --split valid --json | .venv/bin/python -c 'import json,sys; print(round(json.load(sys.stdin)["accuracy"], 4))')"
done
.venv/bin/python scripts/compare_tfidf.py --corpus movie-reviews --baseline-only
