"""The one training loop for every family.

A family's model provides `loss(batch) -> (summed loss, logs, state)` and `count_tokens(batch)`;
the data side provides `batches(position)` (an endless iterator of (batch, next position)) and
`validate(model) -> metrics`. Everything needed to continue bit for bit is in the checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import torch

from tfx.config import HIGHER_IS_BETTER
from tfx.data.batching import DataPosition
from tfx.errors import RunError
from tfx.nn.attention.base import aux_losses
from tfx.registry import OPTIMIZER, SCHEDULE
from tfx.rundir.files import BEST, METRICS
from tfx.train.tensorboard import open_writer, write_scalars
from tfx.train import checkpoint as ckpt
from tfx.train import distributed as dist
from tfx.train import early_stop
from tfx.train.ema import WeightAverage
from tfx.train import sharded
from tfx.train.precision import autocast_for, resolve_precision  # autocast_for: also re-exported
from tfx.train.progress import Progress
from tfx.train.runtime import StopFlag, select_device, trim_metrics  # noqa: F401  (re-exported)


class TrainStep:
    """One optimizer step over a list of micro-batches (gradient accumulation), shared by the
    training loop and `tfx bench train`. Takes the data pipeline's host batches: token counts are
    read there, before the (pinned, asynchronous) copy to the device, so the step never waits for
    the device. Returns the detached summed loss (plus a zero-weighted gradient norm, so a NaN/inf
    gradient shows in it), the loss tokens and the input tokens.

    With `parallel` (DistributedDataParallel or FSDP2 over `model.loss`, see tfx.train.distributed
    and tfx.train.sharded) the micro-batches are the GLOBAL ones, the same on every rank: the token counts are theirs (so the
    normalisation is by the global count, as one process would do it), and this rank trains on its
    rows of each. Both average the gradients over the ranks, so the loss is scaled by the world size:
    the synced gradient is then the sum over all ranks' tokens divided by the global count, the
    one-process gradient of the same batch. The returned loss is this rank's part of the sum."""

    def __init__(self, model, optimizer, *, cfg, autocast, scaler=None, device=None, parallel=None):
        self.model, self.optimizer, self.cfg, self.autocast, self.scaler = model, optimizer, cfg, autocast, scaler
        self.device = device or next(model.parameters()).device
        self.input_tokens = getattr(model, "input_tokens", None)  # throughput where the loss is not per token
        self.parallel, self.rank, self.world = parallel, dist.rank() if parallel else 0, dist.world() if parallel else 1
        call = parallel if parallel is not None else model.loss
        self.loss = torch.compile(call) if cfg.compile else call

    def __call__(self, micro: list[dict], states: list) -> tuple[torch.Tensor, int, int]:
        model, optimizer, scaler, cfg = self.model, self.optimizer, self.scaler, self.cfg
        n_tokens = sum(model.count_tokens(b) for b in micro)
        seen = sum(self.input_tokens(b) for b in micro) if self.input_tokens else n_tokens
        if self.parallel is not None:
            micro = [dist.shard(b, self.rank, self.world) for b in micro]
        micro = [self.to_device(b) for b in micro]
        total = None
        for j, batch in enumerate(micro):
            last = j == len(micro) - 1  # only its backward syncs (the gradients accumulated before it)
            with dist.accumulating(self.parallel, last) if self.parallel is not None else contextlib.nullcontext():
                total = self.micro_step(batch, states, j, n_tokens, len(micro), total)
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
                grad_norm = grad_norm.full_tensor()
            total = total + grad_norm.detach() * 0
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total, n_tokens, seen

    def micro_step(self, batch: dict, states: list, j: int, n_tokens: int, n_micro: int, total):
        model, scaler = self.model, self.scaler
        with self.autocast():
            loss_sum, parts, states[j] = self.loss(batch, states[j])  # a segment memory carries on
        loss = loss_sum / n_tokens  # per-token over the whole accumulated batch
        if self.world > 1:
            loss = loss * self.world  # DDP's mean over ranks becomes the sum over the global batch
        if (aux := aux_losses(model)) is not None:  # kernels' penalties (adaptive span)
            loss = loss + aux / n_micro
        if (aux := parts.get("aux_loss")) is not None:  # the model's own (memory reconstruction)
            loss = loss + aux / n_micro
        (scaler.scale(loss) if scaler else loss).backward()
        return loss_sum.detach() if total is None else total + loss_sum.detach()

    def to_device(self, batch: dict) -> dict:
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}


class Trainer:
    """One training run's moving parts: the optimizer and schedule, the step, data position and
    best score, the segment memories carried between steps (one per micro-batch), metrics.jsonl
    and the checkpoints. `train_loop` drives it."""

    def __init__(self, *, cfg, model, validate: Callable | None, run_dir: Path, log: Callable[[str], None]):
        self.cfg, self.model, self.validator, self.run_dir, self.log = cfg, model, validate, run_dir, log
        self.rank, self.world = dist.rank(), dist.world()
        self.device = select_device(cfg.device)
        model.to(self.device)
        self.sharded = cfg.parallel == "fsdp"  # sharded (DCP) checkpoints, at any world size
        self.fsdp = self.world > 1 and self.sharded
        self.replica = None  # FSDP: rank 0's unsharded copy, to validate and to write the full weights
        self.gathered_at = -1  # the step whose weights the replica holds
        if self.fsdp:
            self.replica = copy.deepcopy(model) if self.rank == 0 else None
            self.parallel = sharded.shard(model)
        else:  # world > 1: gradients all-reduced by DDP (the process group is tfx.train.distributed's)
            self.parallel = dist.wrap(model, self.device) if self.world > 1 else None
        self.optimizer = OPTIMIZER.build(cfg.optimizer, model=model)  # after sharding: on the shards
        self.lr_at = SCHEDULE.build(cfg.schedule, lr=cfg.optimizer.lr, steps=cfg.steps)
        self.precision, why = resolve_precision(cfg.precision, self.device)
        if cfg.precision == "auto":
            log(f"train.precision = 'auto': {self.precision} ({why.removeprefix('auto: ')})")
        self.autocast = autocast_for(self.device, self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.metrics_path = run_dir / METRICS
        self.step, self.position, self.best, self.last_saved = 0, DataPosition(), math.inf, 0
        self.states: list = [None] * cfg.grad_accum  # per micro-batch: a segment memory between steps, else None
        self.metrics_file = None
        self.board = None  # a TensorBoard SummaryWriter (train.tensorboard), rank 0
        self.tokens_seen, self.train_seconds = 0, 0.0  # logged as seen_tokens, train_time; in checkpoints
        self.early = early_stop.EarlyStop(cfg.patience)  # validations without a better best_metric (train.patience)
        self.ema = WeightAverage(model, cfg.ema) if cfg.ema else None  # validated in place of the weights

    def restore(self) -> None:
        """Continue from the run's latest checkpoint: weights, optimizer, RNG, data position, memories."""
        if self.fsdp:
            ckpt.require_sharded(self.run_dir)  # a DDP run's checkpoint does not load into FSDP shards
        trainer, extra = ckpt.load_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer)
        self.step, self.position, self.best = trainer["step"], DataPosition(**trainer["data"]), trainer["best"]
        self.tokens_seen, self.train_seconds = trainer.get("seen_tokens", 0), trainer.get("train_time", 0.0)
        same_metric = trainer.get("best_metric", "loss") == self.cfg.best_metric
        if not same_metric:
            self.best = math.inf  # best.safetensors was chosen on another metric: the next validation replaces it
        self.early.restore(trainer, same_metric=same_metric)
        self.restore_rng(extra)
        if self.ema and not self.ema.restore(extra):
            self.log("the checkpoint has no weight average (train.ema): it starts again from the restored weights")
        for j, saved in enumerate(extra.get("memory") or []):
            if saved and j < len(self.states):  # the memory kind's State.save(), or an old run's list
                self.states[j] = self.model.restore_memory(saved, self.device)
        if self.rank == 0:
            trim_metrics(self.metrics_path, self.step)
        self.last_saved = self.step
        self.log(f"resumed from step {self.step}")

    def restore_rng(self, extra: dict) -> None:
        """Each rank's own RNG state (dropout masks) where the checkpoint has it: a run saved by N
        processes keeps N of them, an older or 1-process run only rank 0's. A rank beyond those (a
        resume on more processes) starts from a seed of (train.seed, rank, step) instead."""
        cpu = extra.get("rng_ranks", [extra["rng_cpu"]])
        cuda = extra.get("rng_cuda_ranks", [extra["rng_cuda"]] if "rng_cuda" in extra else [])
        if self.rank < len(cpu):
            torch.set_rng_state(cpu[self.rank].clone())  # a row of the saved stack: its own storage, offset 0
        else:
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.step + self.rank)
        if self.device.type == "cuda" and self.rank < len(cuda):
            torch.cuda.set_rng_state(cuda[self.rank].clone())
        if self.world > len(cpu):
            self.log(f"the checkpoint keeps the RNG state of {len(cpu)} process(es); ranks {len(cpu)}.."
                     f"{self.world - 1} start from new seeds (train.seed, rank, step)")

    def rng_states(self) -> dict:
        """RNG states to save: rank 0's as `rng_cpu` / `rng_cuda`, and under torchrun every rank's (a
        collective)."""
        extra = {"rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state()
        if self.world > 1:
            extra["rng_ranks"] = torch.stack(dist.gather_objects(extra["rng_cpu"]))
            if self.device.type == "cuda":
                extra["rng_cuda_ranks"] = torch.stack(dist.gather_objects(extra["rng_cuda"]))
        return extra

    def unsharded(self) -> torch.nn.Module | None:
        """The model with all its weights, on rank 0: the model itself, or under FSDP the replica
        with the weights gathered into it (a collective; the other ranks get None)."""
        if not self.fsdp:
            return self.model if self.rank == 0 else None
        if self.gathered_at != self.step:  # a step that validates and saves gathers once
            weights = sharded.full_weights(self.parallel)
            if self.replica is not None:
                self.replica.load_state_dict(weights)
            self.gathered_at = self.step
        return self.replica

    def write(self, record: dict) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.board is not None:
            write_scalars(self.board, record)

    def save(self) -> None:
        """A checkpoint of the step (every rank calls it: the RNG states and FSDP's shards are
        collected from all; rank 0 writes)."""
        extra = self.rng_states()
        saved = [s.memory.save() if s is not None and s.memory is not None else None for s in self.states]
        if any(saved):  # so a resume continues the segment memory
            extra["memory"] = saved
        extra.update(self.ema.state() if self.ema else {})
        trainer = {"step": self.step, "data": asdict(self.position), "best": self.best,
                   "best_metric": self.cfg.best_metric, "seen_tokens": self.tokens_seen, "train_time": self.train_seconds,
                   **self.early.state()}
        if self.sharded:
            ckpt.save_sharded_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer,
                                         weights=self.unsharded(), trainer=trainer, extra=extra,
                                         keep=self.cfg.keep_checkpoints)
        elif self.rank == 0:
            ckpt.save_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer, trainer=trainer,
                                 extra=extra, keep=self.cfg.keep_checkpoints)
        self.last_saved = self.step

    def validate(self, model: torch.nn.Module) -> dict:
        """Validation metrics of `model` (the unsharded one, on rank 0), logged; best.safetensors
        follows train.best_metric."""
        metric = self.cfg.best_metric
        result = {k: v for k, v in self.validator(model).items() if isinstance(v, (int, float, str))}
        self.write({"step": self.step, "split": "valid", **result, "seen_tokens": self.tokens_seen,
                    "train_time": round(self.train_seconds, 3)})
        self.log(f"step {self.step} | valid "
                 + " | ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        score = -result[metric] if metric in HIGHER_IS_BETTER else result[metric]
        improved = score < self.best  # `best` is kept as a number to lower, whatever the metric
        if improved and self.rank == 0:
            self.best = score
            ckpt.save_weights(model, self.run_dir / BEST)
        self.early.observe(self.step, improved)
        return result

    def checked_mean(self, loss_sum: torch.Tensor, tokens: int) -> float:
        mean = float(loss_sum) / tokens  # the one host sync, when logging or saving
        if not math.isfinite(mean):
            raise RunError(f"the loss became {mean} by step {self.step}; stopped without saving. The last good "
                           f"checkpoint (step {self.last_saved}) is kept: lower train.optimizer.lr or raise "
                           f"train.clip, then resume")
        return mean

    def run(self, batches: Callable[[DataPosition], Iterator]) -> dict:
        """Train from the current step to cfg.steps (or max_minutes, or a signal); the last logged metrics."""
        cfg, optimizer = self.cfg, self.optimizer
        stepper = TrainStep(self.model, optimizer, cfg=cfg, autocast=self.autocast, scaler=self.scaler,
                            device=self.device, parallel=self.parallel)
        it = batches(self.position)
        self.model.train()
        window_loss = torch.zeros((), device=self.device)
        window_tokens, window_seen, window_start, last = 0, 0, time.perf_counter(), {}
        deadline = time.perf_counter() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        with StopFlag() as stop, Progress(total=cfg.steps, start=self.step, log=self.log) as progress:
            while self.step < cfg.steps:
                lr = self.lr_at(self.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = []
                for _ in range(cfg.grad_accum):
                    batch, self.position = next(it)
                    while self.world > 1 and dist.rows(batch) < self.world:  # too few rows to share (same on all ranks)
                        batch, self.position = next(it)
                    micro.append(batch)
                loss_sum, n_tokens, seen = stepper(micro, self.states)
                window_loss += loss_sum
                self.step += 1
                if self.ema:
                    self.ema.update(self.model, self.step)
                window_tokens += n_tokens
                window_seen += seen
                self.tokens_seen += seen
                step = self.step
                due = lambda every: every and step % every == 0  # noqa: E731
                timed_out, stopping = time.perf_counter() >= deadline, stop.signal is not None
                if self.world > 1:  # the ranks agree: each got its signal, and keeps its clock, on its own
                    timed_out, stopping = (x > 0 for x in dist.sum_numbers(float(timed_out), float(stopping)))
                final = step == cfg.steps or timed_out
                saving = due(cfg.save_every) or final or stopping
                if due(cfg.log_every) or saving:
                    mean = self.checked_mean(dist.all_reduce_sum(window_loss), window_tokens)
                    elapsed = time.perf_counter() - window_start
                    self.train_seconds += elapsed  # training time: the windows between logs and validations
                    last = {"step": step, "loss": mean, "lr": lr, "tokens_per_s": window_seen / elapsed,
                            "seen_tokens": self.tokens_seen, "train_time": round(self.train_seconds, 3)}
                    self.write(last)
                    progress.update(step, loss=mean, lr=lr, tokens_per_s=last["tokens_per_s"])
                    window_loss.zero_()
                    window_tokens, window_seen, window_start = 0, 0, time.perf_counter()
                if self.validator and (due(cfg.eval_every) or final):
                    self.train_seconds += time.perf_counter() - window_start  # the training before this validation
                    model = self.unsharded()
                    if self.rank == 0:  # computed once; the other ranks wait for it
                        with self.ema.applied(model) if self.ema else contextlib.nullcontext():
                            self.validate(model)
                    early = self.early.share(self.rank)  # rank 0's count and decision reach every rank
                    window_start = time.perf_counter()  # validation time is not training time
                    if early:  # train.patience ran out: saved, so that --resume knows
                        saving = True
                        self.write(self.early.record(step, cfg.best_metric, self.best))
                if saving:
                    self.save()
                if self.early.stopped_at == step:
                    self.log(self.early.stop_line(step, cfg.best_metric, self.best))
                    break
                if timed_out and step < cfg.steps:
                    self.log(f"train.max_minutes ({cfg.max_minutes:g}) reached at step {step}; saved")
                    break
                if stopping:
                    name = signal.Signals(stop.signal).name if stop.signal else "a signal to another rank"
                    self.log(f"{name}: saved step {step}; continue with: tfx train --resume {self.run_dir}")
                    break
        return last


def train_loop(*, cfg, model, batches: Callable[[DataPosition], Iterator], validate: Callable | None,
               run_dir: Path, resume: bool, log: Callable[[str], None]) -> dict:
    """Train `model` for cfg.steps optimizer steps; returns the last logged metrics."""
    if note := early_stop.check(cfg, validation=validate is not None):  # refuses patience without validation
        log(note)
    trainer = Trainer(cfg=cfg, model=model, validate=validate, run_dir=run_dir, log=log)
    if resume:
        trainer.restore()
    else:
        torch.manual_seed(cfg.seed + trainer.rank)
    if trainer.early.spent():  # a resumed run whose patience ran out (it stopped early, or was lowered)
        log(trainer.early.spent_line(trainer.step, cfg.best_metric, trainer.best))
        return {}
    if trainer.step >= cfg.steps:
        log(f"nothing to do: the run is at step {trainer.step} of {cfg.steps} (raise train.steps with --set)")
        return {}
    if trainer.rank == 0:
        trainer.board = open_writer(run_dir) if cfg.tensorboard else None
        trainer.metrics_file = open(trainer.metrics_path, "a", encoding="utf-8")
    try:
        return trainer.run(batches)
    finally:
        if trainer.metrics_file:
            trainer.metrics_file.close()
        if trainer.board is not None:
            trainer.board.close()
