"""What every stage's training shares: the precision a config's "auto" resolves to, and the learning
rate schedule that decays by steps or by the time budget."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch

from sorakit.training.common import (
    BudgetedOptimisation,
    OptimConfig,
    TrainerConfig,
    build_trainer,
    cpu_flags,
    lr_lambda,
    resolve_precision,
    time_budget,
    time_budget_schedule,
)


def test_auto_precision_is_bf16_only_on_cpus_with_fast_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in cpu_flags(info) and cpu_flags(tmp_path / "missing") == set()
    assert resolve_precision("auto", "cpu", cpu_flags(info)) == "bf16-mixed"
    assert resolve_precision("auto", "cpu", {"avx2", "avx512f"}) == "32-true"  # bf16 only converted: no gain
    assert resolve_precision("auto", "cpu", {"amx_bf16", "amx_tile"}) == "bf16-mixed"
    assert resolve_precision("16-mixed", "cpu", set()) == "16-mixed"  # anything else passes through


def test_time_budget_schedule_decays_by_time_or_steps():
    optim = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    clock = {"t": 0.0}
    f = time_budget_schedule(optim, 1000, lambda: clock["t"] / 600.0)
    plain = lr_lambda(optim, 1000)
    assert f(5) == plain(5)  # warm-up is by steps
    assert f(100) == plain(100)  # no time used: the step schedule
    clock["t"] = 300.0  # half the budget at step 100: half-way down the cosine
    assert f(100) == pytest.approx(plain(10 + 495))
    clock["t"] = 600.0
    assert f(100) == pytest.approx(optim.min_lr_ratio)
    clock["t"] = 1.0
    assert f(900) == plain(900)  # steps ahead of time: steps win


def test_time_budget_is_max_minutes_or_less_where_finish_by_comes_first():
    now = 1_000_000.0
    assert time_budget(TrainerConfig(), 0.0, now) == float("inf")
    assert time_budget(TrainerConfig(max_minutes=10), 0.0, now) == 600.0
    assert time_budget(TrainerConfig(max_minutes=10, finish_by=now + 300), 0.0, now) == 300.0
    assert time_budget(TrainerConfig(max_minutes=10, finish_by=now + 300), 200.0, now) == 500.0  # resumed
    assert time_budget(TrainerConfig(max_minutes=10, finish_by=now + 3600), 0.0, now) == 600.0
    assert time_budget(TrainerConfig(finish_by=now + 60), 0.0, now) == 60.0
    with pytest.raises(ValueError, match="finish_by .* has already passed"):
        time_budget(TrainerConfig(finish_by=now - 1), 0.0, now)


class _Cfg:
    def __init__(self, out, **trainer):
        self.out = str(out)
        self.trainer = TrainerConfig(accelerator="cpu", log_every_n_steps=1, **trainer)
        self.optim = OptimConfig(lr=0.1, warmup_steps=0, min_lr_ratio=0.0)


class _Budgeted(BudgetedOptimisation, L.LightningModule):
    """One weight trained by DDP; rank 1 is slower, so the ranks' own clocks disagree."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch, batch_idx):
        time.sleep(0.05 * (1 + self.global_rank))
        return ((self.w - batch) ** 2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=None)

    def on_train_end(self):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        torch.save({"w": self.w.detach().clone(), "lr": lr, "step": self.global_step},
                   f"{self.cfg.out}/rank{self.global_rank}.pt")


def test_time_budget_is_agreed_across_ddp_ranks(tmp_path):
    """With a time budget the learning rate follows the clock, and every DDP rank applies the same one:
    rank 1 runs slower, yet the two replicas end bit-identical, with the rate decayed further than
    the step count alone would take it."""
    cfg = _Cfg(tmp_path, max_steps=1000, max_minutes=0.1, devices=2, strategy="ddp_spawn")
    module = _Budgeted(cfg)
    build_trainer(cfg.trainer, tmp_path).fit(module)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] and 0 < r0["step"] < 1000
    assert torch.equal(r0["w"], r1["w"]) and r0["lr"] == r1["lr"]
    assert r0["lr"] < cfg.optim.lr * lr_lambda(cfg.optim, 1000)(r0["step"]) * 0.5


class _Deadline(_Budgeted):
    """Each rank moves its deadline (an hour away when the Trainer was built) to a few seconds away
    once its process is up, rank 1's later than rank 0's."""

    def on_fit_start(self):
        self.cfg.trainer.finish_by = time.time() + 4 + 3 * self.global_rank

    def on_train_end(self):
        super().on_train_end()
        torch.save({"finish_by": self.cfg.trainer.finish_by, "ended": time.time()},
                   f"{self.cfg.out}/times{self.global_rank}.pt")


def test_every_ddp_rank_stops_at_rank_zeros_deadline(tmp_path):
    cfg = _Cfg(tmp_path, max_steps=1000, finish_by=time.time() + 3600, devices=2, strategy="ddp_spawn")
    build_trainer(cfg.trainer, tmp_path).fit(_Deadline(cfg))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    t0, t1 = (torch.load(tmp_path / f"times{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] and 0 < r0["step"] < 1000
    assert torch.equal(r0["w"], r1["w"]) and r0["lr"] == r1["lr"] < 0.05 * cfg.optim.lr  # decayed to fit
    assert t1["ended"] < t0["finish_by"] + 1 < t1["finish_by"]  # one (slow) step past rank 0's at most


def test_a_run_ends_at_its_deadline_with_its_rate_decayed(tmp_path):
    """finish_by shortens max_minutes: the run stops there, its cosine at the end."""
    cfg = _Cfg(tmp_path, max_steps=100_000, max_minutes=10, finish_by=time.time() + 3600)
    build_trainer(cfg.trainer, tmp_path).fit(_Deadline(cfg))
    end = torch.load(tmp_path / "rank0.pt", weights_only=True)
    times = torch.load(tmp_path / "times0.pt", weights_only=True)
    assert times["ended"] < times["finish_by"] + 1  # one step past it at most
    assert 0 < end["step"] < 100_000 and end["lr"] < 0.05 * cfg.optim.lr  # near the cosine's end (0 here)


def test_a_deadline_already_past_when_training_starts_is_a_clear_error(tmp_path):
    cfg = _Cfg(tmp_path, max_steps=10, finish_by=time.time() - 1)
    with pytest.raises(ValueError, match=r"trainer.finish_by \(.*\) has already passed"):
        build_trainer(cfg.trainer, tmp_path).fit(_Budgeted(cfg))
