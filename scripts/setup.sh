#!/usr/bin/env bash
# Set-up on a fresh clone: a virtual environment in .venv that also sees the system's packages
# (so a torch you already have is kept), torch 2.13.0 (CPU) only where none is importable,
# then tfx itself (editable) with its dependencies and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0" >&2
    .venv/bin/python -m pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import tfx, typer, rich, datasets, sentencepiece, sacrebleu, safetensors, pydantic, pytest" \
        >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.tfx-installed ]; then
    echo "setup: installing tfx and its dependencies" >&2
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch .venv/.tfx-installed
fi
