"""What every stage's training shares: Trainer options, the optimiser and its schedule, resuming.

Each stage's config embeds `TrainerConfig` and `OptimConfig` under `trainer:` and `optim:`, so a
recipe passes Lightning's options (devices, strategy, precision, accumulation, nodes) straight through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch


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


def configure_adamw(params, cfg: OptimConfig, total_steps: int) -> dict:
    """The return value of `LightningModule.configure_optimizers`: AdamW + per-step warm-up/cosine."""
    params = list(params)
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]  # norms and biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def last_checkpoint(out_dir: str | Path) -> Path | None:
    p = checkpoint_dir(out_dir) / "last.ckpt"
    return p if p.is_file() else None


def build_trainer(cfg: TrainerConfig, out_dir: str | Path, optim: OptimConfig | None = None, callbacks=()):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

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
        logger=CSVLogger(str(out_dir), name="logs", version=""),
        callbacks=callbacks,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # WebDataset splits shards by node and worker itself
    )


def fit(trainer, module, datamodule, out_dir: str | Path, resume: bool) -> None:
    """Run `trainer.fit`, continuing from `out_dir/checkpoints/last.ckpt` when `resume` is set."""
    ckpt = last_checkpoint(out_dir) if resume else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
