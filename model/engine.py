"""One training epoch and batched inference over a loader."""

import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.distributed import all_reduce_sum, is_main_process
from model.network import feature_layer
from model.ood import pooled_features
from model.transforms import mix_views

logger = logging.getLogger(__name__)


def train_one_epoch(network, criterion, optimizer, scheduler, loader, device, epoch, *, scaler=None,
                    channels_last=False, progress=True, ema=None, ema_every=1, ema_restart=False, mixing=None,
                    consistency_weight=0.0):
    """Train for one epoch (scheduler stepped per batch); return mean loss, accuracy and images/s.

    With ``ema`` (a weight average) update it every ``ema_every`` steps; ``ema_restart`` (warm-up epochs)
    makes it copy the weights instead of averaging them. With ``mixing``
    (``model.transforms.batch_mixing``) each batch is mixed on the device and the loss takes its soft targets;
    train accuracy then counts the class with the larger share of each mixed film. With ``consistency_weight`` the
    loader yields two views of each film (``model.transforms.TwoViews``): the class loss sees the first, and the
    loss adds the weight times the Jensen-Shannon divergence between the predictions on the two (as AugMix does,
    Hendrycks et al. 2020); both go through the network as one batch. With both, the two views of a film are
    mixed alike (``model.transforms.mix_views``) and the class loss takes the first view's soft targets.
    """
    network.train()
    # Sums stay on the device: a .item() per step would stall the CPU until the GPU caught up, every step.
    total_loss, total_correct, total_seen = 0.0, 0.0, 0
    start = time.perf_counter()
    show_progress = progress and is_main_process()
    batches = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not show_progress)
    for step, (images, targets) in enumerate(batches):
        two_views = isinstance(images, (list, tuple))
        views = [view.to(device, non_blocking=True) for view in (images if two_views else [images])]
        targets = loss_targets = targets.to(device, non_blocking=True)
        if mixing is not None:  # both views of a film mixed alike: still two views of one (mixed) film
            views, loss_targets = mix_views(mixing, views, targets)
            targets = loss_targets.argmax(dim=1)
        images = torch.cat(views) if two_views else views[0]  # one forward pass over both views of each film
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
            logits = network(images)
            if two_views:
                logits, second_logits = logits.split(len(targets))
            class_loss = loss = criterion(logits, loss_targets)
            if two_views:
                loss = class_loss + consistency_weight * jensen_shannon(logits, second_logits)
        backward_and_step(loss, optimizer, scaler)
        scheduler.step()
        if ema is not None and step % ema_every == 0:
            ema.update_parameters(getattr(network, "module", network))
            if ema_restart:
                ema.n_averaged.fill_(0)
        total_loss += class_loss.detach().float() * len(targets)
        total_correct += (logits.detach().argmax(dim=1) == targets).sum()
        total_seen += len(targets)
        if show_progress:
            batches.set_postfix(loss=f"{float(total_loss) / total_seen:.4f}",
                                acc=f"{float(total_correct) / total_seen:.3f}")
    total_loss, total_correct, total_seen = all_reduce_sum([float(total_loss), float(total_correct), total_seen],
                                                           device)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(total_seen, 1),
        "train_accuracy": total_correct / max(total_seen, 1),
        "train_images_per_second": total_seen / elapsed,
    }


def jensen_shannon(first_logits, second_logits):
    """Mean Jensen-Shannon divergence (nats) between the class distributions of two batches of logits."""
    first, second = first_logits.float().softmax(dim=1), second_logits.float().softmax(dim=1)
    log_middle = ((first + second) / 2).clamp(1e-7, 1).log()
    return (nn.functional.kl_div(log_middle, first, reduction="batchmean")
            + nn.functional.kl_div(log_middle, second, reduction="batchmean")) / 2


def backward_and_step(loss, optimizer, scaler=None):
    """Clear the gradients, back-propagate ``loss`` and step ``optimizer`` (through ``scaler`` under fp16 AMP)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def predict_logits(network, loader, device, *, channels_last=False, progress=False, description="eval",
                   with_features=False, feature_grid=1):
    """Run ``network`` over ``loader``; return (logits, targets) as numpy arrays.

    With ``with_features`` also return the last block's activations average-pooled onto a ``feature_grid``
    square (grid 1: the penultimate features, the input of ``fc``): (logits, features, targets).
    """
    network.eval()
    all_logits, all_features, all_targets = [], [], []
    handle = None
    if with_features:
        handle = feature_layer(network).register_forward_hook(
            lambda module, inputs, output: all_features.append(pooled_features(output, feature_grid).cpu())
        )
    try:
        for images, targets in tqdm(loader, desc=description, leave=False, disable=not progress):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            all_logits.append(network(images).float().cpu())
            all_targets.append(targets)
    finally:
        if handle is not None:
            handle.remove()
    logits = torch.cat(all_logits).numpy() if all_logits else np.zeros((0, 0), dtype=np.float32)
    targets = torch.cat(all_targets).numpy() if all_targets else np.zeros((0,), dtype=np.int64)
    if with_features:
        features = torch.cat(all_features).numpy() if all_features else np.zeros((0, 0), dtype=np.float32)
        return logits, features, targets
    return logits, targets
