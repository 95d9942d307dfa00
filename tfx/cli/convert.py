"""`tfx convert SRC OUT`: a Hugging Face model directory to a tfx run, or a tfx run to one (tfx/convert/)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tfx.cli.common import err


def convert(
    src: Path = typer.Argument(..., help="A Hugging Face model directory (config.json + safetensors) or a tfx run."),
    out: Path = typer.Argument(..., help="The tfx run (import) or Hugging Face directory (export) to write."),
    family: Optional[str] = typer.Option(None, help="Import: the tfx family, where an architecture maps to "
                                         "several (bert: mlm or classifier; default from its architectures)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Import: a tfx tokenizer folder (or run) with the model's "
                                             "ids, when the model directory has no tokenizer.json."),
    arch: Optional[str] = typer.Option(None, help="Export: the architecture (gpt2, llama, bert, marian; default: "
                                       "the one that expresses the run exactly)."),
    checkpoint: str = typer.Option("best", help="Export: best (best.safetensors if any) or last weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Convert between a tfx run and a Hugging Face model directory, both ways.

    tfx convert ./gpt2-small runs/gpt2           # import: GPT-2, Llama, BERT, Marian (safetensors only)
    tfx convert runs/shakespeare-bpe ./hf-model  # export: config.json + model.safetensors (+ tokenizer)

    Import reads only safetensors (never a pickle), checks every tensor's name and shape, and
    refuses what tfx cannot express exactly, with the reason. No hub access: pass a directory.
    """
    from tfx.convert import convert as run_convert

    if checkpoint not in ("best", "last"):
        from tfx.errors import UsageError

        raise UsageError(f"--checkpoint {checkpoint}: best or last")
    run_convert(src, out, family=family, tokenizer=tokenizer, arch=arch, checkpoint=checkpoint, force=force, log=err)
