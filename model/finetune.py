"""Warm-start fine-tuning of a trained checkpoint's last stages on cached features: the CPU retraining path.

Training ResNet-152 end to end needs a GPU. Without one, the early stages of a trained model are kept frozen,
their output for every training film is computed once (the clean eval view plus a few augmented views of the
checkpoint's recipe) and cached on disk, and only the last stages (``layer4`` and ``fc`` by default, optionally
the tail of ``layer3``) are trained on that cache, with each (class, source) group drawn about equally often.
The result is an ordinary checkpoint: the same architecture, transform and class names as the one it started from.

Steps, each resumable: ``cache_features`` -> ``train_tail`` (``last.pt`` after every epoch) -> ``calibrate_tail``.
"""

import csv
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.calibration import calibrate_from_outputs
from model.checkpoint import build_model_from_checkpoint, load_checkpoint, make_checkpoint, save_checkpoint
from model.data import group_balanced_weights, make_image_folder, read_manifest_groups
from model.errors import CovidScanError, DataError
from model.metrics import compute_metrics, group_metrics, softmax
from model.ood import DEFAULT_COMPONENTS, DEFAULT_GRID, pooled_features
from model.training import WarmupCosine
from model.transforms import build_eval_transform, build_train_transform

logger = logging.getLogger(__name__)

# Val groups with fewer films than this are reported but do not count towards the selection score.
MIN_SCORED_GROUP = 20


class Tail(nn.Module):
    """The trainable end of a torchvision ResNet: some last blocks of ``layer3`` (optional), ``layer4`` and ``fc``.

    ``forward`` returns ``(logits, layer4 activations)``; the modules are the network's own, so training the tail
    trains the network.
    """

    def __init__(self, blocks, layer4, fc):
        super().__init__()
        self.blocks, self.layer4, self.fc = blocks, layer4, fc

    def forward(self, features):
        activations = self.layer4(self.blocks(features))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(activations, 1), 1)), activations


def split_network(network, train_from="layer4"):
    """Split a torchvision ResNet into a frozen trunk and a trainable ``Tail``.

    ``train_from`` names the first trainable block: ``layer4`` (layer4 + fc) or ``layer3.K`` (blocks K.. of layer3
    too). Returns ``(trunk, tail)``; the trunk's parameters have ``requires_grad`` off.
    """
    first_layer3_block = len(network.layer3)
    if train_from != "layer4":
        prefix, _, index = train_from.partition(".")
        if prefix != "layer3" or not index.isdigit() or not 0 < int(index) < len(network.layer3):
            raise CovidScanError(f"--train-from must be 'layer4' or 'layer3.K' with 0 < K < {len(network.layer3)}, "
                                 f"not {train_from!r}")
        first_layer3_block = int(index)
    trunk = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool, network.layer1, network.layer2,
                          network.layer3[:first_layer3_block])
    tail = Tail(network.layer3[first_layer3_block:], network.layer4, network.fc)
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)
    return trunk.eval(), tail


class ManyViews:
    """The clean eval view followed by ``count`` augmented views of one film, stacked into one tensor."""

    def __init__(self, eval_transform, train_transform, count):
        self.eval_transform, self.train_transform, self.count = eval_transform, train_transform, count

    def __call__(self, image):
        return torch.stack([self.eval_transform(image)] + [self.train_transform(image) for _ in range(self.count)])


def cache_features(trunk, dataset, path, *, views, batch_size=16, workers=2, precision="bf16", progress=True):
    """Write the trunk's output for every film of ``dataset`` (which yields stacked views) to a float16 memmap.

    The file is ``path`` (N x views x C x H x W) with ``path.json`` recording how many films are done, so an
    interrupted run continues where it stopped. Returns the read-only memmap.
    """
    path = Path(path)
    state_path = path.with_suffix(".json")
    with torch.no_grad():
        sample = trunk(dataset[0][0][:1])
    shape = (len(dataset), views) + tuple(sample.shape[1:])
    state = json.loads(state_path.read_text()) if state_path.exists() and path.exists() else None
    if state is not None and tuple(state["shape"]) != shape:
        raise DataError(f"{path} caches shape {state['shape']}, expected {list(shape)}: delete it to rebuild")
    done = state["done"] if state else 0
    if done < len(dataset):
        cache = np.lib.format.open_memmap(path, mode="r+" if state else "w+", dtype=np.float16, shape=shape)
        remaining = torch.utils.data.Subset(dataset, range(done, len(dataset)))
        loader = DataLoader(remaining, batch_size=batch_size, num_workers=workers, shuffle=False)
        started = time.monotonic()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            for images, _ in tqdm(loader, desc=f"cache {path.stem}", disable=not progress):
                count = images.shape[0]
                outputs = trunk(images.flatten(0, 1)).float().unflatten(0, (count, views))
                cache[done:done + count] = outputs.numpy().astype(np.float16)
                done += count
                if done % (batch_size * 16) < batch_size or done == len(dataset):
                    cache.flush()
                    state_path.write_text(json.dumps({"shape": list(shape), "done": done}))
        cache.flush()
        del cache
        state_path.write_text(json.dumps({"shape": list(shape), "done": done}))
        logger.info("cached %s: %d films x %d views in %.1f min", path.name, len(dataset), views,
                    (time.monotonic() - started) / 60)
    return np.load(path, mmap_mode="r")


def selection_score(recalls, *, min_count=MIN_SCORED_GROUP, held_out=()):
    """Mean sensitivity over the val groups with at least ``min_count`` films: no group may be traded away.

    Groups of a ``held_out`` source never count (a leave-one-source-out run must not select on its test source).
    """
    scored = [row["sensitivity"] for name, row in recalls.items()
              if row["n"] >= min_count and name.split("|", 1)[1] not in held_out]
    return float(np.mean(scored)) if scored else 0.0


def tail_outputs(tail, cache, *, view=0, batch_size=64, precision="bf16", grid=None):
    """Run ``tail`` (eval mode) over one view of a feature cache; returns logits (and pooled features with grid)."""
    tail.eval()
    logits, features = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for start in range(0, len(cache), batch_size):
            batch = torch.from_numpy(np.asarray(cache[start:start + batch_size, view], dtype=np.float32))
            batch_logits, activations = tail(batch)
            logits.append(batch_logits.float())
            if grid is not None:
                features.append(pooled_features(activations.float(), grid))
    logits = torch.cat(logits).numpy()
    return (logits, torch.cat(features).numpy()) if grid is not None else logits


def train_tail(tail, train_cache, train_targets, weights, val_cache, val_targets, val_sources, class_names, *,
               output_dir, save_best, epochs=12, batch_size=64, lr=3e-4, weight_decay=0.05, precision="bf16",
               seed=0, time_limit=0.0, progress=True, held_out=()):
    """Train ``tail`` on cached features; after each epoch score val, call ``save_best(val_report)`` on a new best
    and write ``last.pt`` (resumed automatically). Returns the best val report."""
    output_dir = Path(output_dir)
    last_path = output_dir / "last.pt"
    generator = torch.Generator().manual_seed(seed)
    parameters = [parameter for parameter in tail.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_targets) // batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, steps_per_epoch))
    start_epoch, best = 0, {"score": -1.0}
    if last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        tail.load_state_dict(state["tail"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start_epoch, best = state["epoch"] + 1, json.loads(state["best"])
        logger.info("resumed from %s at epoch %d (best val score %.4f)", last_path, start_epoch, best["score"])
    targets = torch.as_tensor(train_targets)
    views = train_cache.shape[1]
    metrics_path = output_dir / "metrics.csv"
    started = time.monotonic()
    for epoch in range(start_epoch, epochs):
        epoch_started = time.monotonic()
        tail.train()
        films = torch.multinomial(weights, steps_per_epoch * batch_size, replacement=True, generator=generator)
        chosen_views = torch.randint(views, (len(films),), generator=generator)
        running_loss = 0.0
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", disable=not progress, leave=False):
            index = films[step * batch_size:(step + 1) * batch_size]
            order = torch.argsort(index)  # sorted reads are kinder to the memmap
            index, view = index[order].numpy(), chosen_views[step * batch_size:(step + 1) * batch_size][order].numpy()
            batch = torch.from_numpy(np.asarray(train_cache[index, view], dtype=np.float32))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, _ = tail(batch)
            loss = F.cross_entropy(logits.float(), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()
        val_logits = tail_outputs(tail, val_cache, precision=precision)
        predictions = val_logits.argmax(1)
        recalls = group_metrics(val_targets, predictions, class_names, val_sources)
        metrics = compute_metrics(np.asarray(val_targets), softmax(val_logits), class_names)
        report = {"epoch": epoch, "score": selection_score(recalls, held_out=held_out),
                  "accuracy": metrics["accuracy"],
                  "macro_f1": metrics["macro_f1"], "train_loss": running_loss / steps_per_epoch, "per_group": recalls}
        logger.info("epoch %d: train loss %.4f, val accuracy %.4f, group-mean sensitivity %.4f (%.1f min) %s", epoch,
                    report["train_loss"], report["accuracy"], report["score"],
                    (time.monotonic() - epoch_started) / 60,
                    " ".join(f"{name}={row['sensitivity']:.2f}" for name, row in recalls.items()))
        _append_metrics(metrics_path, report)
        if report["score"] > best["score"]:
            best = report
            save_best(report)
        torch.save({"tail": tail.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "epoch": epoch,
                    "best": json.dumps(best)}, last_path)
        elapsed = time.monotonic() - started
        if time_limit and epoch + 1 < epochs and elapsed / (epoch + 1 - start_epoch) * (epoch + 2 - start_epoch) > \
                time_limit * 60:
            logger.warning("stopping after epoch %d: another epoch would pass the %.0f-minute limit", epoch,
                           time_limit)
            break
    return best


def _append_metrics(path, report):
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["epoch", "train_loss", "val_accuracy", "val_macro_f1", "val_group_mean_sensitivity"]
                            + list(report["per_group"]))
        writer.writerow([report["epoch"], f"{report['train_loss']:.4f}", f"{report['accuracy']:.4f}",
                         f"{report['macro_f1']:.4f}", f"{report['score']:.4f}"]
                        + [f"{row['sensitivity']:.4f}" for row in report["per_group"].values()])


def calibrate_tail(checkpoint, tail, train_cache, train_targets, val_cache, val_targets, *, false_flag_rate=0.01,
                   precision="bf16"):
    """Fit the temperature on val and the OOD statistics on train from the cached clean views (view 0)."""
    val_logits, val_features = tail_outputs(tail, val_cache, precision=precision, grid=DEFAULT_GRID)
    _, train_features = tail_outputs(tail, train_cache, precision=precision, grid=DEFAULT_GRID)
    return calibrate_from_outputs(checkpoint, train_features, train_targets, val_logits, val_features, val_targets,
                                  components=DEFAULT_COMPONENTS, grid=DEFAULT_GRID, false_flag_rate=false_flag_rate)


def finetune(args):
    """Cache, train and calibrate as described in the module docstring; returns the path of ``best.pt``."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    torch.manual_seed(args.seed)
    checkpoint = load_checkpoint(args.checkpoint)
    class_names = checkpoint["class_names"]
    network = build_model_from_checkpoint(checkpoint)
    trunk, tail = split_network(network, args.train_from)
    params = checkpoint["transform"]
    recipe = args.recipe or checkpoint.get("recipe") or "robust"
    eval_transform = build_eval_transform(params)
    views = ManyViews(eval_transform, build_train_transform(params, recipe=recipe), args.views)
    train_set = make_image_folder(data / "train", views, class_names=class_names)
    val_set = make_image_folder(data / "val", ManyViews(eval_transform, None, 0), class_names=class_names)
    manifest = Path(args.manifest) if args.manifest else data / "MANIFEST.csv"
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest} (group-balanced sampling needs each film's source)")
    groups = read_manifest_groups(manifest)
    train_sources, val_sources = ([groups.get(str(Path(path).resolve()), {"source": "unknown"})["source"]
                                   for path, _ in dataset.samples] for dataset in (train_set, val_set))
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.train_from}-{params['image_size']}"
    options = {"batch_size": 16, "workers": args.workers, "precision": args.precision, "progress": args.progress}
    val_cache = cache_features(trunk, val_set, cache_dir / f"val-{tag}.npy", views=1, **options)
    train_cache = cache_features(trunk, train_set, cache_dir / f"train-{tag}-v{args.views}.npy",
                                 views=1 + args.views, **options)
    weights = group_balanced_weights(train_set.targets, train_sources, min_group=args.min_group,
                                     balance=args.balance)
    held_out = set(args.holdout_source or ())
    unknown = held_out - set(train_sources)
    if unknown:
        raise DataError(f"--holdout-source {', '.join(sorted(unknown))}: no such source in {manifest} "
                        f"(sources: {', '.join(sorted(set(train_sources)))})")
    if held_out:  # leave-one-source-out: never drawn, never scored; its val films are reported only
        weights[[source in held_out for source in train_sources]] = 0.0
    drawn = Counter()
    for (target, source), weight in zip(zip(train_set.targets, train_sources), weights.tolist()):
        drawn[f"{class_names[target]}|{source}"] += weight
    logger.info("share of draws per group: %s", ", ".join(f"{name} {share:.3f}" for name, share in sorted(drawn.items())))
    best_path = output_dir / "best.pt"
    metadata = {key: checkpoint[key] for key in ("model_name", "recipe") if key in checkpoint}
    provenance = {
        "warm_start": {"checkpoint": str(args.checkpoint), "model_version": checkpoint.get("model_version")},
        "finetune": {key: value for key, value in vars(args).items() if isinstance(value, (str, int, float, bool))},
        "data": {"dataset": data.name, "train_counts": dict(Counter(class_names[t] for t in train_set.targets)),
                 "val_counts": dict(Counter(class_names[t] for t in val_set.targets))},
    }

    def save_best(report):
        save_checkpoint(make_checkpoint(network, arch=checkpoint["arch"], class_names=class_names, transform=params,
                                        epoch=report["epoch"], val_metrics=report, **metadata, **provenance),
                        best_path)

    train_tail(tail, train_cache, train_set.targets, weights, val_cache, val_set.targets, val_sources, class_names,
               output_dir=output_dir, save_best=save_best, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               weight_decay=args.weight_decay, precision=args.precision, seed=args.seed, time_limit=args.time_limit,
               progress=args.progress, held_out=held_out)
    best = load_checkpoint(best_path)
    network.load_state_dict(best["state_dict"])
    report = calibrate_tail(best, tail, train_cache, train_set.targets, val_cache, val_set.targets,
                            precision=args.precision, false_flag_rate=args.false_flag_rate)
    save_checkpoint(best, best_path)
    (output_dir / "calibration.json").write_text(json.dumps(report, indent=2))
    logger.info("calibrated %s: %s", best_path, json.dumps(report))
    return best_path
