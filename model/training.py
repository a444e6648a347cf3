"""The training run behind ``scripts/train.py``: data, model, optimiser, epochs, checkpoints (DDP-aware).

``train`` reads as its steps: ``build_data``, ``build_model``, ``resume``, then per epoch ``train_one_epoch``,
``validate`` and ``save_epoch``; ``scripts/train.py`` gives the run-level options and ``model.presets`` the recipe.
"""

import csv
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

from model import distributed
from model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, to_serving
from model.data import (
    class_counts,
    inverse_frequency_weights,
    make_image_folder,
    read_manifest_sources,
    source_balanced_weights,
)
from model.engine import predict_logits, train_one_epoch
from model.errors import CheckpointError, DataError
from model.metrics import compute_metrics, softmax
from model.network import build_model
from model.presets import get_preset
from model.transforms import (
    TwoViews,
    batch_mixing,
    build_eval_transform,
    build_train_transform,
    eval_transform_params,
)

logger = logging.getLogger(__name__)

METRICS_FIELDS = (
    "epoch", "lr", "train_loss", "train_accuracy", "train_images_per_second", "val_loss", "val_accuracy", "val_macro_f1", "val_ece", "val_accuracy_raw", "epoch_seconds", "is_best",
)


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """An exponential moving average of the weights and BatchNorm buffers (as in torchvision's references).

    ``decay`` applies per update; ``ema_decay`` turns a half-life in epochs into that number.
    """

    def __init__(self, network, decay):
        # One fused lerp per (device, dtype) group: a per-tensor Python loop launched ~3700 small kernels per step
        # on ResNet-152 (benchmarks/bench_training.py).
        super().__init__(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def ema_decay(half_life_epochs, steps_per_epoch, update_every):
    """Per-update decay that halves an old weight's share after ``half_life_epochs`` epochs."""
    updates_per_epoch = max(1.0, steps_per_epoch / update_every)
    return 0.5 ** (1.0 / (half_life_epochs * updates_per_epoch))


def seed_everything(seed):
    """Seed Python, NumPy and torch so runs repeat."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class WarmupCosine:
    """Learning-rate multiplier: linear warm-up then cosine decay to zero at ``total_steps``.

    A callable object rather than a closure so that ``--fit-time-limit`` can shorten the decay mid-run.
    """

    def __init__(self, total_steps, warmup_steps):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epochs_that_fit(limit_minutes, elapsed_seconds, epoch_seconds, next_epoch, end_epoch, min_epochs):
    """The epoch count to end the schedule at so that the run ends inside ``limit_minutes``.

    ``epoch_seconds`` is the pace (the mean of this process's epochs after its first, which also pays for
    worker start-up and cuDNN's algorithm search). Only ever shortens ``end_epoch``, never below
    ``min_epochs`` (the warm-up) or ``next_epoch``.
    """
    remaining = limit_minutes * 60 - elapsed_seconds
    fitting = next_epoch + max(0, math.floor(remaining / epoch_seconds))
    return max(min(end_epoch, fitting), min_epochs, next_epoch)


def _loader(dataset, args, *, shuffle, sampler=None):
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=args.device.startswith("cuda"),
        persistent_workers=args.workers > 0,
        drop_last=shuffle and len(dataset) > args.batch_size,
    )


@dataclasses.dataclass
class Run:
    """Where this process trains: device, rank among ``world_size`` processes, output folder."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    output_dir: Path

    @property
    def last_path(self):
        return self.output_dir / "last.pt"

    @property
    def best_path(self):
        return self.output_dir / "best.pt"


@dataclasses.dataclass
class TrainingData:
    """The datasets and loaders of a run, with the eval transform's parameters that the checkpoint stores."""

    train_set: object
    val_set: object
    class_names: list
    transform_params: dict
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: object
    mixing: object


@dataclasses.dataclass
class TrainingModel:
    """The network and everything that updates it."""

    network: nn.Module
    model_for_training: nn.Module  # the network, or its DistributedDataParallel wrapper
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: WarmupCosine
    scaler: object
    ema: object = None

    @property
    def selected(self):
        """The weights that val scores and best.pt holds: the average when there is one."""
        return self.ema.module if self.ema is not None else self.network


@dataclasses.dataclass
class Progress:
    """Where the run stands, saved in last.pt so that ``--resume`` continues it."""

    start_epoch: int = 0
    end_epoch: int = 0
    best_score: float = -1.0
    epochs_without_improvement: int = 0
    best_val_metrics: dict = None


def _learning_rate(args, preset):
    return preset.lr if args.lr is None else args.lr


def _warmup_epochs(args, preset):
    return preset.warmup_epochs if args.warmup_epochs is None else args.warmup_epochs


def start_run(args):
    """Join the process group (under torchrun), seed, and make the output folder."""
    device = torch.device(args.device)
    rank, world_size, local_rank = distributed.init_distributed(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    seed_everything(args.seed + rank)
    output_dir = Path(args.output_dir)
    if distributed.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    return Run(device, rank, world_size, local_rank, output_dir)


def build_data(args, preset, run):
    """The train and val ImageFolders with the preset's transforms, their loaders and the batch mixing."""
    data_root = Path(args.data)
    if not data_root.is_dir():
        raise DataError(f"data folder not found: {data_root}")
    transform_params = eval_transform_params(image_size=args.image_size, recipe=preset.recipe,
                                             intensity=preset.intensity, resize_mode=preset.resize_mode,
                                             trim_borders=preset.trim_borders)
    train_transform = build_train_transform(transform_params, recipe=preset.recipe)
    if preset.consistency_weight > 0:  # the class loss sees the recipe's view, the consistency term both
        train_transform = TwoViews(train_transform, build_train_transform(transform_params, recipe="robust"))
    train_set = make_image_folder(data_root / "train", train_transform)
    class_names = train_set.classes
    val_set = make_image_folder(data_root / "val", build_eval_transform(transform_params), class_names=class_names)
    logger.info("classes %s; train %s; val %s", class_names, class_counts(train_set), class_counts(val_set))
    sampler = None
    if run.world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=run.world_size, rank=run.rank, shuffle=True,
                                     seed=args.seed)
    elif args.sampler == "source":
        manifest = Path(args.manifest) if args.manifest else data_root / "MANIFEST.csv"
        if not manifest.is_file():
            raise DataError(f"--sampler source needs a MANIFEST.csv with source_repo (looked for {manifest})")
        weights = source_balanced_weights(train_set, read_manifest_sources(manifest))
        generator = torch.Generator().manual_seed(args.seed)
        sampler = WeightedRandomSampler(weights, num_samples=len(train_set), replacement=True, generator=generator)
    return TrainingData(
        train_set=train_set, val_set=val_set, class_names=class_names, transform_params=transform_params,
        train_loader=_loader(train_set, args, shuffle=True, sampler=sampler),
        val_loader=_loader(val_set, args, shuffle=False), sampler=sampler,
        mixing=batch_mixing(len(class_names), mixup_alpha=preset.mixup_alpha),
    )


def build_training_model(args, preset, data, run):
    """The network, the class-weighted loss, the optimiser, the warm-up + cosine schedule and the weight average."""
    network = build_model(args.arch, len(data.class_names), args.weights,
                          freeze_backbone=args.freeze_backbone,
                          zero_init_residual=preset.zero_init_residual)
    network.to(run.device)
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(weight=inverse_frequency_weights(data.train_set).to(run.device))
    optimizer = build_optimizer(args, preset, [p for p in network.parameters() if p.requires_grad])
    steps_per_epoch = len(data.train_loader)
    schedule = WarmupCosine(args.epochs * steps_per_epoch, _warmup_epochs(args, preset) * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if run.device.type == "cuda" and args.amp else None
    ema = None
    if preset.model_ema:
        decay = ema_decay(preset.model_ema_half_life, steps_per_epoch, preset.model_ema_steps)
        ema = ExponentialMovingAverage(network, decay)
        logger.info("weight average: decay %.5f every %d steps (half-life %.2f epochs); val scores the average",
                    decay, preset.model_ema_steps, preset.model_ema_half_life)
    model_for_training = network
    if run.world_size > 1:
        model_for_training = nn.parallel.DistributedDataParallel(
            network, device_ids=[run.local_rank] if run.device.type == "cuda" else None
        )
    return TrainingModel(network, model_for_training, criterion, optimizer, scheduler, schedule, scaler, ema)


def build_optimizer(args, preset, parameters):
    """AdamW (default) or SGD with Nesterov momentum."""
    learning_rate = _learning_rate(args, preset)
    if args.opt == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=args.weight_decay)


def resume(args, model, run):
    """Load ``--resume`` (a last.pt; "auto": OUTPUT_DIR/last.pt when present) into ``model``; return the progress."""
    progress = Progress(end_epoch=args.epochs)
    if not args.resume:
        return progress
    resume_path = Path(args.resume) if args.resume != "auto" else run.last_path
    if not resume_path.is_file():
        if args.resume != "auto":
            raise CheckpointError(f"--resume {resume_path}: no such file")
        return progress
    state = load_checkpoint(resume_path)
    if "optimizer" not in state:
        raise CheckpointError(f"{resume_path} is a serving checkpoint; --resume needs a last.pt")
    model.network.load_state_dict(state["state_dict"])
    model.optimizer.load_state_dict(state["optimizer"])
    model.scheduler.load_state_dict(state["scheduler"])
    if model.ema is not None:
        if state.get("ema_state_dict") is not None:
            model.ema.load_state_dict(state["ema_state_dict"])
        else:
            logger.info("the weight average starts from the resumed weights")
    progress = Progress(start_epoch=state["epoch"] + 1, end_epoch=args.epochs, best_score=state["best_score"],
                        epochs_without_improvement=state["epochs_without_improvement"],
                        best_val_metrics=state.get("val_metrics"))
    if state.get("end_epoch") and state.get("args", {}).get("epochs") == args.epochs:
        progress.end_epoch = min(args.epochs, state["end_epoch"])  # a schedule shortened by --fit-time-limit stays
    logger.info("resumed from %s at epoch %d", resume_path, progress.start_epoch)
    return progress


def validate(model, data, run, args):
    """Val metrics of the selected weights, their loss, and the accuracy of the trained weights themselves."""
    logits, targets = predict_logits(model.selected, data.val_loader, run.device, channels_last=args.channels_last)
    val_metrics = compute_metrics(targets, softmax(logits), data.class_names)
    val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)))
    raw_accuracy = _raw_accuracy(model.ema, model.network, data.val_loader, run.device, args.channels_last,
                                 val_metrics)
    return val_metrics, val_loss, raw_accuracy


def save_epoch(model, data, run, args, progress, metadata, *, epoch, val_metrics, is_best, write_last):
    """Write best.pt (a serving checkpoint) when the epoch is the best, and last.pt (resumable) when asked."""
    checkpoint = make_checkpoint(
        model.selected, arch=args.arch, class_names=data.class_names, transform=data.transform_params,
        epoch=epoch, val_metrics=val_metrics if is_best else None, **metadata,
    )
    if is_best:
        save_checkpoint(to_serving(checkpoint), run.best_path)
    if write_last:
        if model.ema is not None:  # last.pt resumes the trained weights; the average travels beside them
            checkpoint.update(state_dict=model.network.state_dict(), ema_state_dict=model.ema.state_dict())
        checkpoint.update(
            val_metrics=progress.best_val_metrics, optimizer=model.optimizer.state_dict(),
            scheduler=model.scheduler.state_dict(), best_score=progress.best_score,
            epochs_without_improvement=progress.epochs_without_improvement, end_epoch=progress.end_epoch,
        )
        save_checkpoint(checkpoint, run.last_path)


def _checkpoint_metadata(args, preset, data):
    """What best.pt and last.pt carry besides the weights: recipe, preset, arguments, data provenance."""
    return {
        "recipe": preset.recipe,
        "preset": {"name": args.preset, **dataclasses.asdict(preset)},
        "args": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "data": {
            "dataset": Path(args.data).resolve().name,
            "train_counts": class_counts(data.train_set),
            "val_counts": class_counts(data.val_set),
        },
        "model_name": f"covidscan-{args.arch}",
    }


def _fit_schedule(args, progress, epoch, elapsed_seconds, epoch_durations, preset):
    """``--fit-time-limit``: shorten the schedule from the pace of epochs 2+ so that it ends inside the limit."""
    if not (args.time_limit and args.fit_time_limit and len(epoch_durations) >= 2):
        return
    pace = sum(epoch_durations[1:]) / len(epoch_durations[1:])
    fitted = epochs_that_fit(args.time_limit, elapsed_seconds, pace, epoch + 1, progress.end_epoch,
                             _warmup_epochs(args, preset) + 1)
    if fitted < progress.end_epoch:
        logger.info("--fit-time-limit: %.1f s per epoch, so the schedule now ends after %d epochs instead of %d",
                    pace, fitted, progress.end_epoch)
        progress.end_epoch = fitted


def train(args, preset=None):
    """Run a training job described by the parsed ``scripts/train.py`` arguments; return the best.pt path.

    ``preset`` (a ``model.presets.Preset``) defaults to the one ``args.preset`` names.
    """
    preset = preset or get_preset(args.preset)
    run = start_run(args)
    data = build_data(args, preset, run)
    model = build_training_model(args, preset, data, run)
    progress = resume(args, model, run)
    metadata = _checkpoint_metadata(args, preset, data)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    steps_per_epoch = len(data.train_loader)
    # The decay ends at end_epoch: --epochs may differ on resume (a second stage), --fit-time-limit shortens it.
    model.schedule.total_steps = progress.end_epoch * steps_per_epoch
    checkpoint_every = max(1, args.checkpoint_every)
    run_start, epoch_durations = time.perf_counter(), []
    for epoch in range(progress.start_epoch, args.epochs):
        if epoch >= progress.end_epoch:
            break
        epoch_start = time.perf_counter()
        # Reseeding per epoch makes a resumed run draw the same augmentations as an uninterrupted one.
        seed_everything(args.seed + 1000 * epoch + run.rank)
        if isinstance(data.sampler, DistributedSampler):
            data.sampler.set_epoch(epoch)
        learning_rate = model.optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(
            model.model_for_training, model.criterion, model.optimizer, model.scheduler, data.train_loader,
            run.device, epoch, scaler=model.scaler, channels_last=args.channels_last, progress=args.progress,
            ema=model.ema, ema_every=preset.model_ema_steps, ema_restart=epoch < _warmup_epochs(args, preset),
            mixing=data.mixing, consistency_weight=preset.consistency_weight,
        )
        stop = False
        if distributed.is_main_process():
            val_metrics, val_loss, raw_accuracy = validate(model, data, run, args)
            is_best = val_metrics["macro_f1"] > progress.best_score
            if is_best:
                progress.best_score, progress.epochs_without_improvement = val_metrics["macro_f1"], 0
                progress.best_val_metrics = val_metrics
            else:
                progress.epochs_without_improvement += 1
            row = {
                "epoch": epoch, "lr": learning_rate, **train_stats, "val_loss": val_loss,
                "val_accuracy": val_metrics["accuracy"], "val_macro_f1": val_metrics["macro_f1"],
                "val_ece": val_metrics["ece"], "val_accuracy_raw": raw_accuracy,
                "epoch_seconds": time.perf_counter() - epoch_start, "is_best": int(is_best),
            }
            _append_metrics(run.output_dir / "metrics.csv", row)
            logger.info(
                "epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f s%s",
                epoch, train_stats["train_loss"], train_stats["train_accuracy"], val_loss,
                val_metrics["accuracy"], val_metrics["macro_f1"], row["epoch_seconds"], " (best)" if is_best else "",
            )
            epoch_durations.append(row["epoch_seconds"])
            stop = args.patience > 0 and progress.epochs_without_improvement >= args.patience
            if stop:
                logger.info("early stopping: val macro-F1 has not improved for %d epochs", args.patience)
            else:
                _fit_schedule(args, progress, epoch, time.perf_counter() - run_start, epoch_durations, preset)
            if not stop and out_of_time(args.time_limit, time.perf_counter() - run_start,
                                        epoch - progress.start_epoch + 1, epoch + 1 < progress.end_epoch):
                stop = True
                logger.info("stopping after epoch %d: another epoch would pass --time-limit %.1f min "
                            "(best.pt and last.pt are written; --resume auto continues)", epoch, args.time_limit)
            write_last = stop or epoch + 1 >= progress.end_epoch or (epoch + 1) % checkpoint_every == 0
            save_epoch(model, data, run, args, progress, metadata, epoch=epoch, val_metrics=val_metrics,
                       is_best=is_best, write_last=write_last)
        distributed.barrier()
        progress.end_epoch = distributed.broadcast_int(progress.end_epoch, run.device)  # rank 0's schedule
        model.schedule.total_steps = progress.end_epoch * steps_per_epoch
        if distributed.broadcast_flag(stop, run.device):
            break
    distributed.cleanup()
    return run.best_path


def out_of_time(limit_minutes, elapsed_seconds, epochs_done, more_epochs):
    """True when one more epoch, at the mean pace so far, would end after ``limit_minutes`` (0: no limit)."""
    if not limit_minutes or not more_epochs:
        return False
    return elapsed_seconds + elapsed_seconds / epochs_done > limit_minutes * 60


def _raw_accuracy(ema, network, loader, device, channels_last, val_metrics):
    """Val accuracy of the trained weights themselves (the same as val_accuracy without a weight average)."""
    if ema is None:
        return val_metrics["accuracy"]
    logits, targets = predict_logits(network, loader, device, channels_last=channels_last)
    return float((logits.argmax(axis=1) == targets).mean()) if len(targets) else 0.0


def _append_metrics(path, row):
    """Append ``row``; a file begun by an older version with fewer columns is rewritten with all of them."""
    rows, rewrite = [], not path.is_file()
    if not rewrite:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if list(reader.fieldnames or []) != list(METRICS_FIELDS):
                rows, rewrite = list(reader), True
    if rewrite:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    with path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=METRICS_FIELDS, extrasaction="ignore").writerow(row)
