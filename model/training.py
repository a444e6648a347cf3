"""The training run behind ``scripts/train.py``: data, model, optimiser, epochs, checkpoints (DDP-aware)."""

import csv
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
from model.adversary import SourceAdversary, WithSources, source_indices
from model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint, to_serving
from model.data import (
    class_counts,
    inverse_frequency_weights,
    make_image_folder,
    read_manifest_sources,
    source_balanced_weights,
)
from model.engine import predict_logits, train_one_epoch
from model.errors import CheckpointError, CovidScanError, DataError
from model.metrics import compute_metrics, softmax
from model.network import build_model
from model.transforms import (
    ROBUST_SETTINGS,
    TwoViews,
    batch_mixing,
    build_eval_transform,
    build_train_transform,
    eval_transform_params,
)

logger = logging.getLogger(__name__)

METRICS_FIELDS = (
    "epoch", "lr", "train_loss", "train_accuracy", "train_images_per_second", "train_source_accuracy",
    "val_loss", "val_accuracy", "val_macro_f1", "val_ece", "val_accuracy_raw", "epoch_seconds", "is_best",
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


def build_optimizer(args, parameters):
    """AdamW (default) or SGD with Nesterov momentum."""
    if args.opt == "sgd":
        return torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)


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


def train(args):
    """Run a full training job described by the parsed ``scripts/train.py`` arguments."""
    consistency_weight = getattr(args, "consistency_weight", 0.0)
    # The robust recipe's settings shape its own films, or the consistency view (--consistency-weight)
    robust_view = args.recipe == "robust" or consistency_weight > 0
    if getattr(args, "robust_without", None) and not robust_view:
        raise CovidScanError("--robust-without leaves augmentations out of --recipe robust only "
                             "(or of the --consistency-weight view)")
    # Set away from their defaults with the tutorial recipe, the robust recipe's settings would be silently ignored
    robust_settings = {name: getattr(args, name, default) for name, default in ROBUST_SETTINGS.items()}
    for name, value in robust_settings.items():
        if value != ROBUST_SETTINGS[name] and not robust_view:
            raise CovidScanError(f"--{name.replace('_', '-')} applies to --recipe robust only "
                                 "(or to the --consistency-weight view)")
    left_out = getattr(args, "robust_without", None) or ()
    if robust_settings["crop_scale"] != ROBUST_SETTINGS["crop_scale"] and "crop" in left_out:
        raise CovidScanError("--crop-scale sets the robust recipe's crops, which --robust-without crop leaves out")
    mixup_alpha, cutmix_alpha = getattr(args, "mixup_alpha", 0.0), getattr(args, "cutmix_alpha", 0.0)
    if getattr(args, "source_adversary", 0.0) > 0 and (mixup_alpha or cutmix_alpha):
        raise CovidScanError("--source-adversary needs each film's own class; it cannot be combined with "
                             "--mixup-alpha or --cutmix-alpha")
    if consistency_weight > 0 and getattr(args, "source_adversary", 0.0) > 0:
        raise CovidScanError("--consistency-weight and --source-adversary cannot be combined")
    device = torch.device(args.device)
    rank, world_size, local_rank = distributed.init_distributed(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    seed_everything(args.seed + rank)
    output_dir = Path(args.output_dir)
    if distributed.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)

    data_root = Path(args.data)
    if not data_root.is_dir():
        raise DataError(f"data folder not found: {data_root}")
    transform_params = eval_transform_params(image_size=args.image_size, recipe=args.recipe,
                                             intensity=getattr(args, "intensity", None),
                                             resize_mode=getattr(args, "resize", None),
                                             trim_borders=getattr(args, "trim_borders", False))
    robust_options = {"frame_probability": getattr(args, "random_frame", 0.0),
                      "flip_probability": getattr(args, "hflip", 0.0), "without": left_out, **robust_settings}
    if args.recipe == "robust":
        train_transform = build_train_transform(transform_params, recipe="robust", **robust_options)
    else:
        train_transform = build_train_transform(transform_params, recipe=args.recipe)
    if consistency_weight > 0:  # the class loss sees the recipe's view, the consistency term both
        train_transform = TwoViews(train_transform,
                                   build_train_transform(transform_params, recipe="robust", **robust_options))
    train_set = make_image_folder(data_root / "train", train_transform)
    val_set = make_image_folder(
        data_root / "val", build_eval_transform(transform_params), class_names=train_set.classes
    )
    class_names = train_set.classes
    mixing = batch_mixing(len(class_names), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    logger.info("classes %s; train %s; val %s", class_names, class_counts(train_set), class_counts(val_set))

    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    elif args.sampler == "source":
        manifest = Path(args.manifest) if args.manifest else data_root / "MANIFEST.csv"
        if not manifest.is_file():
            raise DataError(f"--sampler source needs a MANIFEST.csv with source_repo (looked for {manifest})")
        weights = source_balanced_weights(train_set, read_manifest_sources(manifest))
        generator = torch.Generator().manual_seed(args.seed)
        sampler = WeightedRandomSampler(weights, num_samples=len(train_set), replacement=True, generator=generator)
    adversary_weight = getattr(args, "source_adversary", 0.0)
    train_source_names = None
    if adversary_weight > 0:
        if world_size > 1:
            raise DataError("--source-adversary runs in a single process (its head is not synchronised by DDP)")
        manifest = Path(args.manifest) if args.manifest else data_root / "MANIFEST.csv"
        if not manifest.is_file():
            raise DataError(f"--source-adversary needs a MANIFEST.csv with source_repo (looked for {manifest})")
        indices, train_source_names = source_indices(train_set, read_manifest_sources(manifest))
        logger.info("source adversary (weight %g) over sources %s", adversary_weight, train_source_names)
    train_loader = _loader(WithSources(train_set, indices) if train_source_names else train_set, args,
                           shuffle=True, sampler=sampler)
    val_loader = _loader(val_set, args, shuffle=False)

    network = build_model(
        args.arch, len(class_names), args.weights,
        freeze_backbone=args.freeze_backbone, zero_init_residual=getattr(args, "zero_init_residual", False),
    )
    network.to(device)
    channels_last = args.channels_last
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    class_weights = inverse_frequency_weights(train_set).to(device) if args.class_weighting == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=args.label_smoothing)
    adversary = None
    if train_source_names:
        adversary = SourceAdversary(network, len(class_names), len(train_source_names), adversary_weight).to(device)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, trainable + (list(adversary.parameters()) if adversary else []))
    steps_per_epoch = len(train_loader)
    schedule = WarmupCosine(args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and args.amp else None

    start_epoch, best_score, epochs_without_improvement, best_val_metrics = 0, -1.0, 0, None
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    state = {}
    if args.resume:
        resume_path = Path(args.resume) if args.resume != "auto" else last_path
        if resume_path.is_file():
            state = load_checkpoint(resume_path)
            if "optimizer" not in state:
                raise CheckpointError(f"{resume_path} is a serving checkpoint; --resume needs a last.pt")
            network.load_state_dict(state["state_dict"])
            if adversary is not None and state.get("adversary_state_dict") is not None:
                adversary.load_state_dict(state["adversary_state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch"] + 1
            best_score = state["best_score"]
            epochs_without_improvement = state["epochs_without_improvement"]
            best_val_metrics = state.get("val_metrics")
            logger.info("resumed from %s at epoch %d", resume_path, start_epoch)
        elif args.resume != "auto":
            raise CheckpointError(f"--resume {resume_path}: no such file")

    ema = None
    if getattr(args, "model_ema", False):
        decay = ema_decay(args.model_ema_half_life, steps_per_epoch, args.model_ema_steps)
        if adversary is not None:
            adversary.remove()  # the average deep-copies the network, hooks included
        ema = ExponentialMovingAverage(network, decay)
        if adversary is not None:
            adversary.attach(network)
        if state.get("ema_state_dict") is not None:
            ema.load_state_dict(state["ema_state_dict"])
        elif start_epoch > 0:
            logger.info("the weight average starts from the resumed weights")
        logger.info("weight average: decay %.5f every %d steps (half-life %.2f epochs); val scores the average",
                    decay, args.model_ema_steps, args.model_ema_half_life)

    model_for_training = network
    if world_size > 1:
        model_for_training = nn.parallel.DistributedDataParallel(
            network, device_ids=[local_rank] if device.type == "cuda" else None
        )

    provenance = {
        "dataset": data_root.resolve().name,
        "train_counts": class_counts(train_set),
        "val_counts": class_counts(val_set),
    }
    metadata = {
        "recipe": args.recipe,
        "args": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "data": provenance,
        "model_name": f"covidscan-{args.arch}",
    }
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    run_start, end_epoch, epoch_durations = time.perf_counter(), args.epochs, []
    if state.get("end_epoch") and state.get("args", {}).get("epochs") == args.epochs:
        end_epoch = min(args.epochs, state["end_epoch"])  # a schedule shortened by --fit-time-limit stays short
    # The decay ends at end_epoch: --epochs may differ on resume (a second stage), --fit-time-limit shortens it.
    schedule.total_steps = end_epoch * steps_per_epoch
    checkpoint_every = max(1, getattr(args, "checkpoint_every", 1))
    for epoch in range(start_epoch, args.epochs):
        if epoch >= end_epoch:
            break
        epoch_start = time.perf_counter()
        # Reseeding per epoch makes a resumed run draw the same augmentations as an uninterrupted one.
        seed_everything(args.seed + 1000 * epoch + rank)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        learning_rate = optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(
            model_for_training, criterion, optimizer, scheduler, train_loader, device, epoch,
            scaler=scaler, channels_last=channels_last, progress=args.progress,
            ema=ema, ema_every=getattr(args, "model_ema_steps", 1), ema_restart=epoch < args.warmup_epochs,
            adversary=adversary, mixing=mixing, consistency_weight=consistency_weight,
        )
        stop = False
        if distributed.is_main_process():
            selected = ema.module if ema is not None else network
            logits, targets = predict_logits(selected, val_loader, device, channels_last=channels_last)
            probabilities = softmax(logits)
            val_metrics = compute_metrics(targets, probabilities, class_names)
            val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)))
            score = val_metrics["macro_f1"]
            is_best = score > best_score
            if is_best:
                best_score, epochs_without_improvement, best_val_metrics = score, 0, val_metrics
            else:
                epochs_without_improvement += 1
            row = {
                "epoch": epoch, "lr": learning_rate, **train_stats, "val_loss": val_loss,
                "val_accuracy": val_metrics["accuracy"], "val_macro_f1": val_metrics["macro_f1"],
                "val_ece": val_metrics["ece"], "val_accuracy_raw": _raw_accuracy(ema, network, val_loader, device,
                                                                             channels_last, val_metrics),
                "epoch_seconds": time.perf_counter() - epoch_start, "is_best": int(is_best),
            }
            _append_metrics(output_dir / "metrics.csv", row)
            logger.info(
                "epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f s%s",
                epoch, train_stats["train_loss"], train_stats["train_accuracy"], val_loss,
                val_metrics["accuracy"], val_metrics["macro_f1"], row["epoch_seconds"], " (best)" if is_best else "",
            )
            epoch_durations.append(row["epoch_seconds"])
            stop = args.patience > 0 and epochs_without_improvement >= args.patience
            if stop:
                logger.info("early stopping: val macro-F1 has not improved for %d epochs", args.patience)
            time_limit = getattr(args, "time_limit", 0)
            if not stop and time_limit and getattr(args, "fit_time_limit", False) and len(epoch_durations) >= 2:
                pace = sum(epoch_durations[1:]) / len(epoch_durations[1:])
                fitted = epochs_that_fit(time_limit, time.perf_counter() - run_start, pace, epoch + 1, end_epoch,
                                         args.warmup_epochs + 1)
                if fitted < end_epoch:
                    logger.info("--fit-time-limit: %.1f s per epoch, so the schedule now ends after %d epochs "
                                "instead of %d", pace, fitted, end_epoch)
                    end_epoch = fitted
            if not stop and out_of_time(time_limit, time.perf_counter() - run_start,
                                        epoch - start_epoch + 1, epoch + 1 < end_epoch):
                stop = True
                logger.info("stopping after epoch %d: another epoch would pass --time-limit %.1f min "
                            "(best.pt and last.pt are written; --resume auto continues)", epoch, args.time_limit)
            checkpoint = make_checkpoint(
                selected, arch=args.arch, class_names=class_names, transform=transform_params,
                epoch=epoch, val_metrics=val_metrics if is_best else None, **metadata,
            )
            if is_best:
                save_checkpoint(to_serving(checkpoint), best_path)
            if stop or epoch + 1 >= end_epoch or (epoch + 1) % checkpoint_every == 0:  # last.pt
                if ema is not None:  # last.pt resumes the trained weights; the average travels beside them
                    checkpoint.update(state_dict=network.state_dict(), ema_state_dict=ema.state_dict())
                if adversary is not None:
                    checkpoint.update(adversary_state_dict=adversary.state_dict())
                checkpoint.update(
                    val_metrics=best_val_metrics, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    best_score=best_score, epochs_without_improvement=epochs_without_improvement,
                    end_epoch=end_epoch,
                )
                save_checkpoint(checkpoint, last_path)
        distributed.barrier()
        end_epoch = distributed.broadcast_int(end_epoch, device)  # every rank follows rank 0's schedule
        schedule.total_steps = end_epoch * steps_per_epoch
        if distributed.broadcast_flag(stop, device):
            break
    distributed.cleanup()
    return best_path


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
