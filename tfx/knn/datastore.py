"""The kNN-LM datastore of a run (Khandelwal et al., 2020), on disk under RUN/knn/:

    keys.npy       (N, d) float16 (default) or float32 .npy memmap: the key of every scored position
    values.npy     (N,) int32 .npy memmap: the token that followed it
    index.faiss    a faiss index over the keys: IndexFlatL2 (exact) or IndexIVFPQ (trained on a sample)
    meta.json      count, dim, dtypes, index parameters, source text (path, bytes, sha256), checkpoint
    settings.json  lambda, k, temperature (and nprobe) chosen by `tfx knn tune`

Row i holds the key computed for target i + 1 of the token stream (the position that predicts it),
so the store follows the text's order. meta.json is the commit marker: a build writes every file
under a temporary name and fsyncs it, removes the old meta.json, renames the files into place and
writes meta.json last (atomically). A kill at any moment leaves the old store, the complete new
one, or no store (a clear "build one" message), never a mix; the rest of the run is never touched.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tfx.errors import RunError, UsageError
from tfx.knn.keys import key_dim, scored_positions
from tfx.rundir.files import atomic_write_text, commit, fsync_dir, sha256_file  # noqa: F401

FILES = ("keys.npy", "values.npy", "index.faiss")
AUTO_FLAT_MAX = 1_000_000  # --index auto: exact search up to this many keys, IVF-PQ beyond
KEY_DTYPES = ("float16", "float32")


def store_dir(run_dir) -> Path:
    return Path(run_dir) / "knn"


def load_faiss():
    """faiss, using as many threads as torch (so OMP_NUM_THREADS and train.threads bound both)."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - a declared dependency
        raise RunError("kNN-LM needs faiss: pip install faiss-cpu") from None
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    return faiss


class Meter:
    """Progress of a long pass on stderr: a rich bar on a terminal, a plain line every few seconds
    otherwise (stdout stays data only)."""

    def __init__(self, total: int, what: str, log, every: float = 5.0):
        self.total, self.what, self.log, self.every = total, what, log, every
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.bar = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.log(f"{self.what}: {self.done:,}/{self.total:,} tokens ({100 * self.done / self.total:.0f}%), "
                     f"{rate:,.0f} tokens/s")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def default_pq_m(dim: int) -> int:
    """Sub-quantizers: the largest divisor of dim up to min(64, dim/2) (64 bytes a key, as the paper)."""
    return max(m for m in range(1, max(1, min(64, dim // 2)) + 1) if dim % m == 0)


def plan_index(kind: str, count: int, dim: int, *, nlist: int | None = None, pq_m: int | None = None,
               pq_bits: int = 8, train_size: int = 100_000, nprobe: int | None = None) -> dict:
    """The index parameters, checked before any work: {"kind": "flat"} or IVF-PQ's."""
    if kind == "auto":
        kind = "flat" if count <= AUTO_FLAT_MAX else "ivfpq"
    if kind == "flat":
        return {"kind": "flat"}
    if kind != "ivfpq":
        raise UsageError(f"--index {kind!r}: expected auto, flat (exact) or ivfpq")
    n_train = min(count, train_size)
    nlist = nlist or max(1, min(int(4 * math.sqrt(count)), n_train // 39))
    pq_m = pq_m or default_pq_m(dim)
    if nlist <= 0 or pq_m <= 0 or train_size <= 0:
        raise UsageError("--nlist, --pq-m and --train-size must be positive")
    if dim % pq_m:
        raise UsageError(f"--pq-m {pq_m}: must divide the key dimension {dim}")
    if not 1 <= pq_bits <= 16:
        raise UsageError(f"--pq-bits {pq_bits}: expected 1..16")
    if n_train < max(nlist, 2 ** pq_bits):
        raise UsageError(f"--index ivfpq: {n_train:,} training keys are too few for nlist {nlist} and "
                         f"{2 ** pq_bits} codes per sub-quantizer (--pq-bits {pq_bits}); lower --nlist or "
                         f"--pq-bits, or use --index flat")
    return {"kind": "ivfpq", "nlist": nlist, "pq_m": pq_m, "pq_bits": pq_bits, "trained_on": n_train,
            "nprobe": min(nprobe or 32, nlist)}


def build_index(keys: np.ndarray, plan: dict, *, seed: int = 0, chunk: int = 65_536):
    """A faiss index over keys (N, d), any float dtype, added in chunks (float32 copies)."""
    faiss = load_faiss()
    n, dim = keys.shape
    if plan["kind"] == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, plan["nlist"], plan["pq_m"], plan["pq_bits"])
        sample = np.sort(np.random.default_rng(seed).choice(n, size=plan["trained_on"], replace=False))
        index.train(np.ascontiguousarray(keys[sample], dtype=np.float32))
        index.nprobe = plan["nprobe"]
    for i in range(0, n, chunk):
        index.add(np.ascontiguousarray(keys[i:i + chunk], dtype=np.float32))
    return index


def typical_distance(index, keys: np.ndarray, *, sample: int = 512, seed: int = 0) -> float:
    """Median squared distance from a stored key to its nearest other key: the scale of the
    temperature (exp(-d/T) needs T near typical d to be neither flat nor one-hot)."""
    n = keys.shape[0]
    if n < 2:
        return 1.0
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    dists, _ = index.search(np.ascontiguousarray(keys[rows], dtype=np.float32), 2)
    d = dists[:, 1][np.isfinite(dists[:, 1]) & (dists[:, 1] > 0)]
    return float(np.median(d)) if d.size else 1.0


def build_datastore(run_dir, model, ids: torch.Tensor, *, context: int, stride: int | None = None,
                    batch_size: int = 32, device="cpu", dtype: str = "float16", plan: dict,
                    source: dict, checkpoint: dict, log) -> dict:
    """Run the LM over `ids` (score_stream's windows) and write the store; returns its meta."""

    if dtype not in KEY_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected float16 or float32")
    count, dim = ids.numel() - 1, key_dim(model)
    if count < 1:
        raise UsageError("nothing to store: the text has fewer than 2 tokens")
    faiss = load_faiss()
    root = store_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = {name: root / f".{name}.tmp" for name in FILES}
    committed = False
    try:
        keys = np.lib.format.open_memmap(tmp["keys.npy"], mode="w+", dtype=dtype, shape=(count, dim))
        values = np.lib.format.open_memmap(tmp["values.npy"], mode="w+", dtype=np.int32, shape=(count,))
        with Meter(count, "knn build", log) as meter:
            for pos, key, _, target in scored_positions(model, ids, context=context, stride=stride,
                                                         batch_size=batch_size, device=device):
                rows = (pos - 1).numpy()
                keys[rows] = key.cpu().numpy().astype(dtype)
                values[rows] = target.cpu().numpy()
                meter.advance(len(rows))
        keys.flush()
        values.flush()
        del keys, values
        keys = np.load(tmp["keys.npy"], mmap_mode="r")
        if plan["kind"] != "flat":
            log(f"knn build: training IVF-PQ (nlist {plan['nlist']}, pq-m {plan['pq_m']}, "
                f"{plan['pq_bits']} bits) on {plan['trained_on']:,} keys")
        index = build_index(keys, plan)
        faiss.write_index(index, str(tmp["index.faiss"]))
        meta = {
            "count": count, "dim": dim, "key_dtype": dtype, "value_dtype": "int32",
            "key": "input of the last block's feed-forward sublayer (norm2(x))",
            "index": plan, "typical_distance": typical_distance(index, keys),
            "context": context, "stride": min(stride or context, context),
            "source": source, "checkpoint": checkpoint, "faiss": faiss.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        del keys
        # Commit: invalidate the old store first, so no reader ever sees a mix of old and new files.
        (root / "meta.json").unlink(missing_ok=True)
        fsync_dir(root)
        for name in FILES:
            commit(tmp[name], root / name)
        atomic_write_text(root / "meta.json", json.dumps(meta, indent=1) + "\n")
        committed = True
    finally:
        if not committed:
            for path in tmp.values():
                path.unlink(missing_ok=True)
    return meta


class Datastore:
    """A built store, opened read-only: keys and values as memmaps, the faiss index in memory.

    `search` returns squared L2 distances and values of the k nearest keys; for an IVF-PQ index the
    distances of the retrieved keys are recomputed from the stored keys (the codes only choose
    them), as the paper does with its full-precision keys. With `candidates` > k the codes choose
    that many and the exact distances pick the k nearest among them (re-ranking: it repairs the
    order that quantization got wrong).
    """

    def __init__(self, run_dir):
        root = store_dir(run_dir)
        if not (root / "meta.json").is_file():
            raise UsageError(f"{run_dir} has no kNN datastore; build one first: tfx knn build {run_dir} "
                             f"--split train (or --data FILE)")
        faiss = load_faiss()
        try:
            self.meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
            self.keys = np.load(root / "keys.npy", mmap_mode="r")
            self.values = np.load(root / "values.npy", mmap_mode="r")
            self.index = faiss.read_index(str(root / "index.faiss"))
        except Exception as exc:  # json, numpy and faiss raise many types for damaged files
            raise RunError(f"{root}: cannot read the datastore ({exc}); rebuild it with tfx knn build") from None
        self.root, self.count, self.dim = root, int(self.meta["count"]), int(self.meta["dim"])
        if (self.keys.shape != (self.count, self.dim) or self.values.shape != (self.count,)
                or self.index.ntotal != self.count or self.index.d != self.dim):
            raise RunError(f"{root}: the datastore's files disagree with meta.json; rebuild it with tfx knn build")
        self.kind = self.meta["index"]["kind"]
        self.nprobe = self.meta["index"].get("nprobe")
        self.exact_distances = self.kind != "flat"
        self._ivf = faiss.extract_index_ivf(self.index) if self.kind != "flat" else None

    def search(self, queries: torch.Tensor, k: int, *, nprobe: int | None = None,
               candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) keys -> (dists (n, k) float32 ascending, values (n, k) int64); a missing
        neighbour (an IVF search that found fewer than k) has distance inf and value -1.
        `candidates` (IVF-PQ only; default k): keys retrieved by the codes before exact re-ranking."""
        dists, rows = self.nearest(queries, k, nprobe=nprobe, candidates=candidates)
        return dists, self.values_of(rows)

    def values_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The tokens that followed the given rows (int64); -1 where the row is -1 (missing)."""
        ids = rows.numpy()
        vals = self.values[np.where(ids < 0, 0, ids).reshape(-1)].astype(np.int64).reshape(ids.shape)
        vals[ids < 0] = -1
        return torch.from_numpy(vals)

    def nearest(self, queries: torch.Tensor, k: int, *, nprobe: int | None = None,
                candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`search`'s neighbours as rows of the store: (dists (n, k), rows (n, k) int64, -1 missing).
        Row r holds the key computed at token r of the stream the store was built on."""
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())  # (n, d)
        k = max(1, min(k, self.count))
        if self._ivf is not None:
            self._ivf.nprobe = nprobe or self.nprobe
        wanted = k  # with exact distances, re-rank `candidates` and keep the k nearest of them
        if self.exact_distances:
            k = max(k, min(candidates or k, self.count))
        dists, ids = self.index.search(q, k)  # (n, k) each
        missing = ids < 0
        ids = np.where(missing, 0, ids)
        if self.exact_distances:
            step = max(1, (1 << 22) // (k * self.dim))  # rows per chunk: (step, k, d) float32 of 16 MiB
            for i in range(0, len(q), step):
                rows = self.keys[ids[i:i + step].reshape(-1)].astype(np.float32).reshape(-1, k, self.dim)
                dists[i:i + step] = ((rows - q[i:i + step, None, :]) ** 2).sum(-1)  # (c, k)
            dists[missing] = np.inf
            order = np.argsort(dists, axis=1, kind="stable")[:, :wanted]
            dists, ids, missing = (np.take_along_axis(a, order, 1) for a in (dists, ids, missing))
        else:
            dists[missing] = np.inf
        ids = ids.astype(np.int64)
        ids[missing] = -1
        return torch.from_numpy(dists), torch.from_numpy(ids)

    def settings_path(self) -> Path:
        return self.root / "settings.json"

    def saved_settings(self) -> dict | None:
        path = self.settings_path()
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RunError(f"{path}: not valid JSON ({exc}); run tfx knn tune again or delete it") from None

    def save_settings(self, settings: dict) -> Path:
        atomic_write_text(self.settings_path(), json.dumps({**settings, "store": self.meta.get("created")},
                                                           indent=1) + "\n")
        return self.settings_path()
