"""Training the VideoCoCa captioner with Lightning: `sorakit train captioner --config recipes/toy/captioner.yaml`.

Data comes from caption-bearing shards in one of two modes:

* streaming (default, for real datasets): the shared shard reader (`clip_pipeline`, resampled,
  split by node and worker), frames spread over each whole clip, letterboxed per batch in workers;
* `data.preload: true` (small datasets such as the toy world): every clip is decoded once, up front,
  into RAM as the model's uint8 input, and epochs are reshuffled from there. Decoding costs more
  than a training step of a small model, so this is what makes the toy recipe fit in minutes.

Output: `OUT/` is a captioner model directory (config.json + model.safetensors, EMA weights when
EMA is on), `OUT/text_encoder/` its text tower as a text-encoder directory for the DiT,
`OUT/checkpoints/last.ckpt` for `--resume`, `OUT/logs/metrics.csv`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch

from sorakit.config import from_dict, save_config, to_dict
from sorakit.training.common import (BudgetedOptimisation, OptimConfig, TrainerConfig, build_trainer, fit,
                                     log_trained_steps, trained_steps)


@dataclass
class CaptionerDataConfig:
    shards: str = ""  # training shards with captions: a directory, a tar, or a glob
    batch_size: int = 32
    num_workers: int = 2  # DataLoader workers (streaming) / decoding threads (preload)
    preload: bool = False  # decode every clip once into RAM (datasets that fit), instead of streaming
    shuffle: int = 1000  # streaming: sample shuffle buffer
    fps: float | None = None  # streaming: resample clips to this rate first (decodes less of long clips)
    trim_vocab: bool = False  # use only the BPE tokens of the training captions (small softmax; from-scratch only)


@dataclass
class TrainCaptionerConfig:
    preset: str = "toy"  # model size: tiny, toy, base (sorakit.models.captioner.PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset, e.g. {num_frames: 6}
    init: str | None = None  # open_clip CoCa checkpoint initialising the towers (base preset)
    out: str = "runs/captioner"
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0  # CoCa's weighting: captioning counts twice
    # torch CPU threads (0: torch's default, one per core). On a machine shared with other jobs, 1 thread
    # per process avoids OpenMP oversubscription, which can slow small models down several times.
    cpu_threads: int = 0
    data: CaptionerDataConfig = field(default_factory=CaptionerDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.data.batch_size < 2:
            raise ValueError("data.batch_size must be at least 2 (the contrastive loss compares within a batch)")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Collate:
    """Stack frames and tokenise captions; holds the text config so it pickles cheaply into workers."""

    def __init__(self, text_config):
        self.text_config = text_config
        self._tok = None

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        if self._tok is None:
            self._tok = self.text_config.tokenizer()
        frames, captions = zip(*items)
        return {"frames": torch.stack(frames), "ids": self._tok(list(captions))}


class PreloadedClips(torch.utils.data.Dataset):
    def __init__(self, frames: torch.Tensor, captions: list[str]):
        self.frames, self.captions = frames, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.frames[i], self.captions[i]


def _rank_world() -> tuple[int, int]:
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def preload_clips(shards, num_frames: int, image_size: int, workers: int = 2) -> PreloadedClips:
    """Decode the shards' captioned clips into one uint8 tensor (N, T, 3, S, S)."""
    from rich.progress import Progress

    from sorakit.data.captioning import iter_prepared, sample_caption, sample_meta
    from sorakit.data.shards import list_shards

    mine = list_shards(shards)  # every rank holds all clips; a DistributedSampler splits them evenly
    frames, captions, broken = [], [], 0
    start = time.perf_counter()
    no_caption = lambda m: sample_caption(m, sample_meta(m)) is None  # noqa: E731
    with Progress(transient=True) as bar:
        task = bar.add_task("decoding clips into RAM", total=len(mine))
        for shard in mine:
            for batch in iter_prepared(shard, num_frames, image_size, batch_size=64, workers=workers, skip=no_caption):
                for p in batch:
                    if p.frames is not None:
                        frames.append(p.frames)
                        captions.append(sample_caption(p.members, sample_meta(p.members)))
                    elif p.error:
                        broken += 1
            bar.advance(task)
    if not captions:
        raise ValueError(f"{shards}: no decodable clips with captions to train on")
    print(f"preload: {len(captions)} clips in RAM in {time.perf_counter() - start:.0f}s"
          + (f"; skipped {broken} that could not be decoded" if broken else ""))
    return PreloadedClips(torch.stack(frames), captions)


def streaming_clips(cfg: TrainCaptionerConfig, num_frames: int, image_size: int, seed: int):
    """The shard reader's pipeline, mapped to (frames, caption); clips without a caption are skipped."""
    from sorakit.data.reader import clip_pipeline
    from sorakit.models.captioner import frame_indices, letterbox

    def to_inputs(src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, str]]:
        rng = random.Random(seed)
        for s in src:
            if not s["caption"]:
                continue
            frames = s["frames"]
            # Random offset inside each of the num_frames segments: temporal jitter (TSN-style).
            idx = frame_indices(len(frames), num_frames)
            if len(frames) >= 2 * num_frames:
                seg = len(frames) / num_frames
                idx = [min(len(frames) - 1, int(i * seg + rng.random() * seg)) for i in range(num_frames)]
            yield letterbox(frames[idx], image_size), s["caption"]

    pipe = clip_pipeline(cfg.data.shards, fps=cfg.data.fps, random_window=False, shuffle=cfg.data.shuffle,
                         resampled=True, seed=seed)
    pipe.append(to_inputs)
    return pipe


def training_vocab(shards) -> list[int]:
    """The trimmed vocabulary of a dataset's captions (reads only the caption members' text)."""
    from sorakit.data.captioning import sample_caption, sample_meta
    from sorakit.data.shards import iter_tar_samples, list_shards
    from sorakit.models.text_encoder import CaptionTokenizer

    captions = set()
    for shard in list_shards(shards):
        for _, members in iter_tar_samples(shard):
            c = sample_caption(members, sample_meta(members))
            if c:
                captions.add(c)
    if not captions:
        raise ValueError(f"{shards}: no captions found (KEY.txt or json caption)")
    return CaptionTokenizer.build_vocab(sorted(captions))


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class CaptionerModule(BudgetedOptimisation, L.LightningModule):
    def __init__(self, cfg: TrainCaptionerConfig, model_config):
        super().__init__()
        from sorakit.models.captioner import VideoCoCa

        self.cfg = cfg
        self.model = VideoCoCa(model_config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from sorakit.models.captioner import CONTRASTIVE_KEYS, captioner_losses

        out = self.model(batch["frames"], batch["ids"])
        gathered = None
        if self.trainer.world_size > 1:  # contrast against every rank's clips, not only this rank's
            gathered = {k: self.all_gather(out[k], sync_grads=k != "labels").flatten(0, 1)
                        for k in CONTRASTIVE_KEYS}
        losses = captioner_losses(out, self.model.pad_id, gathered)
        loss = self.cfg.contrastive_weight * losses["contrastive"] + self.cfg.caption_weight * losses["caption"]
        bs = batch["ids"].shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=bs)
        self.log("contrastive", losses["contrastive"], prog_bar=True, batch_size=bs)
        self.log("caption", losses["caption"], prog_bar=True, batch_size=bs)
        log_trained_steps(self, bs)
        return loss


class CaptionerData(L.LightningDataModule):
    def __init__(self, cfg: TrainCaptionerConfig, model_config):
        super().__init__()
        self.cfg, self.model_config = cfg, model_config
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        n, size = self.model_config.num_frames, self.model_config.vision.image_size
        if self.cfg.data.preload:
            self.dataset = preload_clips(self.cfg.data.shards, n, size, self.cfg.data.num_workers)
        else:
            self.dataset = streaming_clips(self.cfg, n, size, self.cfg.trainer.seed)

    def train_dataloader(self):
        d = self.cfg.data
        collate = Collate(self.model_config.text)
        if d.preload:
            rank, world = _rank_world()
            # Equal, disjoint shares per rank, so every rank runs the same number of steps per epoch.
            sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=self.cfg.trainer.seed, drop_last=True)
            return torch.utils.data.DataLoader(self.dataset, batch_size=d.batch_size, sampler=sampler,
                                               drop_last=True, collate_fn=collate)
        # drop_last: the ranks' batches are gathered for the contrastive loss, so they must be equal.
        return torch.utils.data.DataLoader(self.dataset, batch_size=d.batch_size, num_workers=d.num_workers,
                                           collate_fn=collate, persistent_workers=d.num_workers > 0, drop_last=True)


def resolve_model_config(cfg: TrainCaptionerConfig, out: Path, resume: bool):
    """The model config: the one saved by the run being resumed, else the preset + overrides (+ trimmed vocab)."""
    from sorakit.models.captioner import CaptionerConfig, captioner_config, with_vocab
    from sorakit.utils.fs import atomic_write_json

    saved = out / "model_config.json"
    if resume and saved.is_file():
        return from_dict(CaptionerConfig, json.loads(saved.read_text()), "model")
    model_config = captioner_config(cfg.preset, cfg.model)
    if cfg.data.trim_vocab:
        model_config = with_vocab(model_config, training_vocab(cfg.data.shards))
    atomic_write_json(saved, to_dict(model_config))
    return model_config


def train_captioner(cfg: TrainCaptionerConfig, resume: bool = False) -> Path:
    """Train, then write the model directory and its text encoder into `cfg.out`; returns that path."""
    from sorakit.models.captioner import load_coca_weights
    from sorakit.models.io import save_pretrained
    from sorakit.models.text_encoder import export_text_encoder

    if not cfg.data.shards:
        raise ValueError("data.shards is not set: give the training shards (--set data.shards=DIR)")
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    model_config = resolve_model_config(cfg, out, resume)
    module = CaptionerModule(cfg, model_config)
    if cfg.init:
        left = load_coca_weights(module.model, cfg.init)
        print(f"initialised from {cfg.init}; newly initialised: {', '.join(left) or 'nothing'}")
    trainer = build_trainer(cfg.trainer, out, cfg.optim)
    fit(trainer, module, CaptionerData(cfg, model_config), out, resume)
    if trainer.is_global_zero:
        model = module.model.cpu().eval()
        save_pretrained(model, out, extra={"trained_steps": trained_steps(trainer), "data": cfg.data.shards})
        export_text_encoder(model, out / "text_encoder")
    return out
