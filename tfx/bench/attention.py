"""`tfx bench attention`: median time, tokens/s and peak memory of each kernel against length.

Each kind runs in its own process, lengths in increasing order. On CPU the peak is the process's
peak resident memory above what it held before the first input was made, and the budget is an
RLIMIT_DATA on that process, so a kind that would need more fails an allocation inside it and is
reported as over budget instead of taking the machine down. On CUDA the peak is
max_memory_allocated and the budget a per-process memory fraction.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from queue import Empty


@dataclass
class BenchSettings:
    seqs: list[int]
    mode: str = "fwdbwd"           # fwd | fwdbwd
    causal: bool = True
    batch: int = 1
    heads: int = 4
    d_head: int = 64
    dtype: str = "fp32"            # fp32 | bf16
    device: str = "auto"
    repeats: int = 3
    budget_gib: float = 8.0
    max_seconds: float = 60.0      # a length slower than this per call ends the kind's sweep
    params: dict | None = None     # kind -> recipe parameters
    grids: list[tuple[int, int]] | None = None  # images: patch grids (rows, cols) instead of seqs; T = rows·cols

    def points(self) -> list[tuple[int, tuple[int, int] | None]]:
        """(T, grid) per point, in increasing T."""
        if self.grids:
            return sorted((r * c, (r, c)) for r, c in self.grids)
        return [(T, None) for T in sorted(self.seqs)]


def kernels_for(causal: bool, grid: bool = False) -> list[str]:
    """The kinds that run causal (or bidirectional); those that need a patch grid only with `grid`."""
    from tfx.config import import_kinds
    from tfx.registry import ATTENTION

    import_kinds()
    return [k for k in ATTENTION.names()
            if (ATTENTION.get(k).supports_causal if causal else ATTENTION.get(k).supports_bidirectional)
            and (grid or not ATTENTION.get(k).needs_grid)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _limit_memory(budget_gib: float) -> None:
    """Cap this process's data segment at what it uses now plus the budget."""
    with open("/proc/self/status") as f:
        data_kib = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
    limit = data_kib * 1024 + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def measure_kind(kind: str, s: BenchSettings) -> list[dict]:
    """Every length of one kind; rows with status ok / over memory budget / too slow / error."""
    import torch

    from tfx.config import import_kinds
    from tfx.nn.attention.base import AttnSpec
    from tfx.registry import ATTENTION
    from tfx.train.loop import select_device

    import_kinds()
    device = select_device(s.device)
    dtype = torch.bfloat16 if s.dtype == "bf16" else torch.float32
    cfg = ATTENTION.config_model(kind)(**(s.params or {}).get(kind, {}))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, s.budget_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory))
    else:
        _limit_memory(s.budget_gib)
    base = _rss_mib()
    rows, stopped, last = [], None, None  # last: (T, seconds per call) of the previous length
    for T, grid in s.points():
        row = {"kind": kind, "T": T, "mode": s.mode, "causal": s.causal, "ms": None, "tokens_per_s": None,
               "peak_mib": None, "status": "ok", **({"grid": f"{grid[0]}x{grid[1]}"} if grid else {})}
        rows.append(row)
        if not stopped and last and last[1] * (T / last[0]) ** 2 > s.max_seconds:
            stopped = f"too slow (~{last[1] * (T / last[0]) ** 2:.0f} s per call predicted, quadratic)"
        if stopped:
            row["status"] = stopped
            continue
        try:
            # each length is the kernel's training context (Linformer's projections, BlockBERT's blocks)
            kernel = ATTENTION.build(cfg, n_heads=s.heads, d_head=s.d_head, max_len=T).to(device, dtype)
            kernel.train(s.mode == "fwdbwd")
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(s.batch, s.heads, T, s.d_head, device=device, dtype=dtype, generator=g)
                       .requires_grad_(s.mode == "fwdbwd") for _ in range(3))
            pos = torch.arange(T, device=device)
            spec = AttnSpec(q_pos=pos, k_pos=pos, causal=s.causal, grid=(*grid, 0) if grid else None)

            def call():
                if s.mode == "fwd":
                    with torch.no_grad():
                        kernel(q, k, v, spec)
                else:
                    kernel(q, k, v, spec).sum().backward()
                if cuda:
                    torch.cuda.synchronize()

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            call()  # warm-up, and the first estimate of the time
            first = time.perf_counter() - start
            times = [first]
            if first < s.max_seconds:
                times = []
                for _ in range(s.repeats):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1000
            last = (T, ms / 1000)
            row.update(ms=ms, tokens_per_s=s.batch * T / (ms / 1000),
                       peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib() - base))
            if first >= s.max_seconds:
                stopped = f"too slow (>{s.max_seconds:g} s per call)"
        except (torch.OutOfMemoryError, MemoryError) as exc:
            row["status"] = stopped = f"over memory budget ({s.budget_gib:g} GiB)"
            del exc
        except RuntimeError as exc:
            if "alloc" in str(exc).lower() or "memory" in str(exc).lower():
                row["status"] = stopped = f"over memory budget ({s.budget_gib:g} GiB)"
            else:
                row["status"] = f"error: {str(exc).splitlines()[0][:120]}"
        finally:
            q = k = v = kernel = None
    return rows


def _child(kind: str, settings: dict, queue) -> None:
    try:
        queue.put(measure_kind(kind, BenchSettings(**settings)))
    except BaseException as exc:  # reported as the kind's status, never a crash of the bench
        queue.put([{"kind": kind, "T": T, "status": f"error: {exc!r}"[:160]} for T in settings["seqs"]])


def bench_attention(kinds: list[str], settings: BenchSettings, *, log=print) -> list[dict]:
    """Rows for every kind x length; each kind in a fresh process (its own memory peak and budget)."""
    ctx = mp.get_context("spawn")
    rows = []
    for kind in kinds:
        log(f"bench {kind} ...")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(kind, asdict(settings), queue))
        proc.start()
        while True:
            try:
                got = queue.get(timeout=1.0)
                break
            except Empty:
                if not proc.is_alive():  # killed (the kernel's OOM killer) without reporting
                    got = [{"kind": kind, "T": T, "status": f"crashed (exit {proc.exitcode})"} for T in settings.seqs]
                    break
        proc.join()
        for r in got:
            if r.get("ms") is not None:
                log(f"  T={r['T']:>6}: {r['ms']:9.1f} ms  {r['tokens_per_s']:12,.0f} tok/s  {r['peak_mib']:8.1f} MiB")
            else:
                log(f"  T={r['T']:>6}: {r['status']}")
        rows.extend(got)
    return rows
