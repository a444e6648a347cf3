"""Build torchvision ResNets with a new classification head."""

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from model.errors import WeightsError

logger = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# torchvision's official ImageNet weights per architecture (downloaded from torchvision's hub).
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}


def build_model(arch="resnet152", num_classes=3, weights="none", freeze_backbone=False, zero_init_residual=False):
    """Return a torchvision ResNet whose ``fc`` head has ``num_classes`` outputs.

    ``weights`` is ``"none"`` (random init), ``"imagenet"`` (torchvision's official weights,
    needs internet or a populated torch hub cache) or a path to a local torchvision state dict
    (for air-gapped sites). With ``freeze_backbone`` only the new head is trainable.
    ``zero_init_residual`` starts each residual branch at zero (Goyal et al. 2017), which lets deep
    ResNets trained from scratch learn from the first epoch.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    builder = getattr(torchvision.models, arch)
    if weights in (None, "none"):
        network = builder(zero_init_residual=zero_init_residual)
    elif weights == "imagenet":
        weights_enum = getattr(torchvision.models, IMAGENET_WEIGHTS[arch]).IMAGENET1K_V1
        network = builder(weights=weights_enum)
    else:
        network = builder()
        _load_local_weights(network, Path(weights), arch)
    network.fc = nn.Linear(network.fc.in_features, num_classes)
    if freeze_backbone:
        for name, parameter in network.named_parameters():
            parameter.requires_grad = name.startswith("fc.")
    return network


def _load_local_weights(network, path, arch):
    """Load a torchvision-format state dict (ImageNet head allowed) into ``network``."""
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file (expected 'none', 'imagenet' or a state-dict path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign files
        raise WeightsError(f"--weights {path}: not a PyTorch state dict ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # also accept our own checkpoints
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsError(f"--weights {path}: expected a dict of tensors (a torchvision state dict)")
    # The head is replaced anyway, so a head of any size is fine.
    backbone_state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = {key for key in network.state_dict() if not key.startswith("fc.")}
    missing = sorted(expected - backbone_state.keys())
    unexpected = sorted(backbone_state.keys() - expected)
    if missing or unexpected:
        raise WeightsError(
            f"--weights {path}: does not match {arch} "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    try:
        network.load_state_dict(backbone_state, strict=False)
    except RuntimeError as error:
        raise WeightsError(f"--weights {path}: tensor shapes do not match {arch}: {error}") from error
    logger.info("loaded backbone weights from %s", path)


def feature_layer(network):
    """Return the last convolutional block, whose activations the class activation map uses."""
    return network.layer4
