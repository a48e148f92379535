"""What every stage's training shares: Trainer options, the optimiser and its schedule, resuming.

Each stage's config embeds `TrainerConfig` and `OptimConfig` under `trainer:` and `optim:`, so a
recipe passes Lightning's options (devices, strategy, precision, accumulation, nodes) straight through.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Any = "auto"  # an int, a list of ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp", "fsdp", "ddp_spawn", ...
    precision: str = "32-true"  # Lightning's, or "auto": bf16-mixed where bf16 is fast (`resolve_precision`)
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200
    max_minutes: float | None = None  # wall-clock budget; training stops cleanly when it runs out
    # A deadline (Unix time, e.g. `$(date -d '+50 min' +%s)`): the run ends by then even if max_minutes
    # has not run out, and its schedule decays to fit (a job's time limit, or the demo's hour).
    finish_by: float | None = None
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.0  # 0 turns EMA off; the exported model holds the EMA weights when on


# CPU features that make bf16 matmuls several times faster than float32 ones (bench/cpu_precision.py);
# a CPU without them converts bf16 to float32 for its matmuls, so `bf16-mixed` cannot gain there.
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def resolve_precision(precision: str, accelerator: str, flags: set[str] | None = None) -> str:
    """Lightning's precision for a config's `precision`: "auto" is bf16-mixed where bf16 runs fast
    (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX) and 32-true elsewhere."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    flags = cpu_flags() if flags is None else flags
    return "bf16-mixed" if flags & set(FAST_BF16_CPU_FLAGS) else "32-true"


def lr_lambda(cfg: OptimConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def configure_adamw(params, cfg: OptimConfig, schedule: Callable[[int], float]) -> dict:
    """The return value of `LightningModule.configure_optimizers`: AdamW + a per-step learning-rate
    factor (`time_budget_schedule`, which is `lr_lambda` where no time budget is set)."""
    params = list(params)
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]  # norms and biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def time_budget_schedule(optim: OptimConfig, total_steps: int, used: Callable[[], float]):
    """The shared warm-up + cosine schedule, driven by the step count or by the share of the time
    budget used (`used()`, 0 to 1), whichever is further along: on a slow or busy machine the
    learning rate has still decayed when the time runs out (worth several dB of PSNR to the toy VAE).

    A plain function, not a callable object, so LambdaLR keeps it out of checkpoints."""
    f = lr_lambda(optim, total_steps)

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return f(step)
        by_time = optim.warmup_steps + used() * (total_steps - optim.warmup_steps)
        return f(max(step, int(by_time)))

    return factor


def time_budget(cfg: TrainerConfig, elapsed: float, now: float) -> float:
    """Seconds of training a run may use in all, `elapsed` of them already used (a resumed run's):
    `max_minutes`, or less where `finish_by` comes first (infinite with neither)."""
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    if cfg.finish_by is not None:
        if cfg.finish_by <= now:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cfg.finish_by))
            raise ValueError(f"trainer.finish_by ({when}) has already passed: no time is left to train")
        budget = min(budget, elapsed + cfg.finish_by - now)
    return budget


class BudgetedOptimisation:
    """A LightningModule mixin (`class M(BudgetedOptimisation, L.LightningModule)`) that gives a
    stage AdamW with the shared schedule, decayed by steps or by its time budget, whichever is
    further along (`time_budget_schedule`), and ends the run at `trainer.finish_by`. The module sets
    `self.cfg` with `trainer` and `optim`.

    The clock is the one `build_trainer` gives the Trainer (Lightning's `Timer` callback, which
    stores the time trained in checkpoints, so a resumed run keeps its budget). The time is agreed
    across processes before every step (the slowest process's), and the budget is rank 0's, so every
    DDP rank applies the same learning rate and stops at the same step: the replicas stay identical."""

    _elapsed_agreed = 0.0  # what the schedule reads: the same on every rank
    _budget = math.inf  # seconds, known once the checkpoint (and its clock) is restored
    _timer: Timer | None = None  # found once per fit, not on every step

    def on_train_start(self) -> None:
        tc = self.cfg.trainer
        if not tc.max_minutes and tc.finish_by is None:  # no budget: the schedule never reads the clock
            return
        self._timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if self._timer is None:
            raise RuntimeError("the config sets a time budget but the Trainer keeps no clock: build it "
                               "with build_trainer")
        try:
            budget: float | ValueError = time_budget(tc, self._timer.time_elapsed("train"), time.time())
        except ValueError as e:
            budget = e
        budget = self.trainer.strategy.broadcast(budget)  # rank 0's: every rank the same budget, or error
        if isinstance(budget, ValueError):
            raise budget
        self._budget = budget

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._timer is None:
            return
        elapsed = self._timer.time_elapsed("train")
        if self.trainer.world_size > 1:
            elapsed = float(self.trainer.strategy.reduce(torch.tensor(elapsed, device=self.device), reduce_op="max"))
        self._elapsed_agreed = elapsed
        if elapsed >= self._budget:  # finish_by (max_minutes alone is the Timer's to enforce)
            self.trainer.should_stop = True

    def configure_optimizers(self):
        oc = self.cfg.optim
        # Without a time budget the share used stays 0 (0 / inf), which is the plain step schedule.
        schedule = time_budget_schedule(oc, self.cfg.trainer.max_steps, lambda: self._elapsed_agreed / self._budget)
        return configure_adamw(self.parameters(), oc, schedule)


def log_trained_steps(module: L.LightningModule, batch_size: int) -> None:
    """Log the steps trained as a metric (in `training_step`): with ddp_spawn the main process's Trainer
    never steps, and only logged metrics come back from the worker processes (`trained_steps`)."""
    module.log("trained_steps", float(module.global_step + 1), batch_size=batch_size)


def trained_steps(trainer: L.Trainer) -> int:
    """The steps trained, for an exported model's metadata, whatever the strategy."""
    return max(trainer.global_step, int(trainer.callback_metrics.get("trained_steps", 0)))


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def last_checkpoint(out_dir: str | Path) -> Path | None:
    p = checkpoint_dir(out_dir) / "last.ckpt"
    return p if p.is_file() else None


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes metrics.csv here; this one keeps it and its columns, and rewrites
        # it with a wider header only if the resumed run logs new columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run (`append`, set by `fit`) adds its rows to
    OUT/logs/metrics.csv instead of replacing the history of the steps before the resume."""

    append = False

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and self.append:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment


def build_trainer(cfg: TrainerConfig, out_dir: str | Path, optim: OptimConfig | None = None, callbacks=()):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(callbacks)
    callbacks.append(
        ModelCheckpoint(
            dirpath=checkpoint_dir(out_dir),
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=0,
        )
    )
    if optim is not None and optim.ema_decay > 0:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=optim.ema_decay))
    max_time = None
    if cfg.max_minutes is not None:
        max_time = {"minutes": cfg.max_minutes}
    elif cfg.finish_by is not None:  # a clock for BudgetedOptimisation, which enforces the deadline
        callbacks.append(Timer(verbose=False))
    return L.Trainer(
        max_steps=cfg.max_steps,
        max_time=max_time,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val or None,
        log_every_n_steps=cfg.log_every_n_steps,
        default_root_dir=str(out_dir),
        logger=ResumableCSVLogger(str(out_dir), name="logs", version=""),
        callbacks=callbacks,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # WebDataset splits shards by node and worker itself
    )


def fit(trainer, module, datamodule, out_dir: str | Path, resume: bool) -> None:
    """Run `trainer.fit`, continuing from `out_dir/checkpoints/last.ckpt` when `resume` is set."""
    ckpt = last_checkpoint(out_dir) if resume else None
    if ckpt is not None and isinstance(trainer.logger, ResumableCSVLogger):
        trainer.logger.append = True
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
