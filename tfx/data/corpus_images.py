"""Image corpora from Debian packages: fetch a pinned .deb, read it without dpkg, convert to .npz.

Debian packages carry a few real image datasets (``dataset-fashion-mnist``). ``fetch_deb``
downloads the pinned version with ``apt-get download`` (running ``apt-get update`` once when the
package index does not know it yet) or, where apt is missing, from the Debian archive's pool over
HTTP; the .deb's SHA-256 is checked before anything is read from it. A .deb is an ``ar`` archive
whose ``data.tar.*`` member holds the files: ``deb_files`` reads them in Python, so no dpkg is
needed. Fashion-MNIST's idx files become one ``SPLIT.npz`` per split (images uint8 (N, H, W, C),
labels int64, classes str), byte-identical on every machine (numpy writes its zip entries with a
fixed date).
"""
from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from tfx.errors import RunError

DEBIAN_POOL = "https://deb.debian.org/debian/pool/main"

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # Zalando's label ids 0..9
FASHION_DIR = "usr/share/datasets/fashion-mnist/"
FASHION_VALID = 5000  # the last 5,000 training images are the validation split


def sha256_bytes(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def deb_file_name(package: str) -> str:
    """`name=version` -> the .deb's file name in the archive (`name_version_all.deb`; an epoch's
    colon is written %3a)."""
    name, _, version = package.partition("=")
    return f"{name}_{version.replace(':', '%3a')}_all.deb"


def fetch_deb(package: str, sha256: str, into: str | Path) -> Path:
    """Download `package` (`name=version`) into `into` and check its SHA-256; returns the .deb."""
    into = Path(into)
    target = into / deb_file_name(package)
    if shutil.which("apt-get"):
        _apt_download(package, into)
    else:
        _http_download(package, target)
    debs = sorted(into.glob("*.deb"))
    if len(debs) != 1:
        raise RunError(f"downloading {package} left {len(debs)} .deb files in {into}, not 1")
    digest = sha256_bytes(debs[0].read_bytes())
    if digest != sha256:
        raise RunError(f"{debs[0].name} has sha256 {digest}, not the expected {sha256}; refusing to read it")
    return debs[0]


def _apt_download(package: str, into: Path) -> None:
    def run(*cmd: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, cwd=into, capture_output=True, text=True)
        except OSError as exc:
            raise RunError(f"could not run {cmd[0]}: {exc}") from None

    proc = run("apt-get", "download", package)
    if proc.returncode != 0 and ("Unable to locate" in proc.stderr or "Can't select" in proc.stderr):
        update = run("apt-get", "update")  # a fresh machine's package index may be empty
        if update.returncode == 0:
            proc = run("apt-get", "download", package)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RunError(f"apt-get could not download {package} (exit {proc.returncode}):\n{tail}\n"
                       f"(run `apt-get update` as root, or fetch {deb_file_name(package)} from {DEBIAN_POOL})")


def _http_download(package: str, target: Path) -> None:
    name = package.partition("=")[0]
    url = f"{DEBIAN_POOL}/{name[0]}/{name}/{target.name.replace('%3a', '%253a')}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as exc:
        raise RunError(f"no apt-get here, and {url} could not be fetched: {exc}") from None


def ar_members(blob: bytes) -> dict[str, bytes]:
    """The members of an `ar` archive (a .deb): name -> bytes."""
    if not blob.startswith(b"!<arch>\n"):
        raise RunError("not a .deb (ar) archive")
    out, i = {}, 8
    while i + 60 <= len(blob):
        header = blob[i:i + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        out[name] = blob[i + 60:i + 60 + size]
        i += 60 + size + (size % 2)
    return out


def deb_files(deb: Path, under: str) -> dict[str, bytes]:
    """The files under `under` (a path inside the package, e.g. usr/share/...) in a .deb's data."""
    members = ar_members(deb.read_bytes())
    data = next((name for name in members if name.startswith("data.tar")), None)
    if data is None:
        raise RunError(f"{deb.name} has no data.tar member")
    raw = members[data]
    if data.endswith(".xz"):
        raw = lzma.decompress(raw)
    elif data.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif not data.endswith(".tar"):
        raise RunError(f"{deb.name}: {data} is compressed in a way tfx does not read")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("./")
            if member.isfile() and path.startswith(under):
                out[path[len(under):]] = tar.extractfile(member).read()
    return out


def read_idx(blob: bytes, where: str = "idx file") -> np.ndarray:
    """An idx array (LeCun's MNIST format; gzip-compressed or not): a big-endian header (two zero
    bytes, a type code, the number of dimensions, then each size as uint32), then the values."""
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError) as exc:
            raise RunError(f"{where}: not a readable gzip file ({exc})") from None
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] != 0x08:
        raise RunError(f"{where}: not an idx file of unsigned bytes (bad header)")
    ndim = blob[3]
    shape = tuple(int.from_bytes(blob[4 + 4 * d:8 + 4 * d], "big") for d in range(ndim))
    start, count = 4 + 4 * ndim, int(np.prod(shape))
    if len(blob) != start + count:
        raise RunError(f"{where}: the header says {shape} ({count:,} bytes of data), the file has "
                       f"{len(blob) - start:,}")
    return np.frombuffer(blob, dtype=np.uint8, offset=start).reshape(shape)


def npz_bytes(images: np.ndarray, labels: np.ndarray, classes) -> bytes:
    """A split as .npz bytes: images (N, H, W, C) uint8, labels (N,) int64, classes (K,) str."""
    buffer = io.BytesIO()
    np.savez(buffer, images=np.ascontiguousarray(images, dtype=np.uint8), labels=np.asarray(labels, dtype=np.int64),
             classes=np.asarray(classes, dtype=str))
    return buffer.getvalue()


def convert_fashion_mnist(deb: Path) -> tuple[dict[str, bytes], dict]:
    """dataset-fashion-mnist's four idx files -> train (the first 55,000), valid (the last 5,000 of
    train) and test (10,000) .npz files."""
    files = deb_files(deb, FASHION_DIR)

    def array(name: str) -> np.ndarray:
        if name not in files:
            raise RunError(f"{deb.name} has no {FASHION_DIR}{name}")
        return read_idx(files[name], name)

    train_x, train_y = array("train-images-idx3-ubyte.gz"), array("train-labels-idx1-ubyte.gz")
    test_x, test_y = array("t10k-images-idx3-ubyte.gz"), array("t10k-labels-idx1-ubyte.gz")
    cut = len(train_x) - FASHION_VALID
    out = {
        "train.npz": npz_bytes(train_x[:cut, ..., None], train_y[:cut], FASHION_CLASSES),
        "valid.npz": npz_bytes(train_x[cut:, ..., None], train_y[cut:], FASHION_CLASSES),
        "test.npz": npz_bytes(test_x[..., None], test_y, FASHION_CLASSES),
    }
    sizes = {"train": cut, "valid": FASHION_VALID, "test": len(test_x)}
    return out, {"images": sizes, "image_shape": list(train_x.shape[1:]) + [1], "classes": list(FASHION_CLASSES)}
