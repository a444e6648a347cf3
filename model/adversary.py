"""A domain-adversarial source head (Ganin & Lempitsky, ICML 2015) for ``train.py --source-adversary``.

A linear head reads the pooled features through a gradient-reversal layer and predicts each training
image's source (``source_repo`` of MANIFEST.csv) *within its class*, the quantity the audit's source probe
measures. The head learns to tell sources apart; the reversed gradient pushes the backbone to drop what it
used. Within-class, because across classes the source is the label (every COVID image is adult).
"""

import torch
from torch import nn
from torch.utils.data import Dataset

from model.data import sample_sources


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-scale`` backward."""

    @staticmethod
    def forward(context, features, scale):
        context.scale = scale
        return features.view_as(features)

    @staticmethod
    def backward(context, gradient):
        return -context.scale * gradient, None


class SourceAdversary(nn.Module):
    """Per-class source classifier on ``network``'s pooled features (captured by a hook on ``avgpool``)."""

    def __init__(self, network, num_classes, num_sources, weight=1.0):
        super().__init__()
        self.num_classes, self.num_sources, self.weight = num_classes, num_sources, weight
        self.head = nn.Linear(network.fc.in_features, num_classes * num_sources)
        self._features, self._hook = None, None
        self.attach(network)

    def attach(self, network):
        """Capture ``network``'s pooled features on every forward pass."""
        self.remove()
        self._hook = network.avgpool.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._features = torch.flatten(output, 1)

    def loss(self, class_targets, source_targets):
        """Weighted source cross-entropy of the last forward pass, and the number of sources guessed right."""
        features = GradientReversal.apply(self._features, 1.0)
        logits = self.head(features.float()).view(-1, self.num_classes, self.num_sources)
        logits = logits[torch.arange(len(class_targets), device=logits.device), class_targets]
        correct = (logits.argmax(dim=1) == source_targets).sum().item()
        return self.weight * nn.functional.cross_entropy(logits, source_targets), correct

    def remove(self):
        """Detach the hook from the network (before a deep copy of it, e.g. the weight average)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class WithSources(Dataset):
    """Wrap an ImageFolder so each item is ``(image, (class, source index))``."""

    def __init__(self, dataset, source_indices):
        self.dataset, self.source_indices = dataset, list(source_indices)
        if len(self.source_indices) != len(dataset):
            raise ValueError("one source index per image is needed")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        return image, (target, self.source_indices[index])


def source_indices(dataset, sources):
    """Index of each image's source (``sources``: resolved path -> source_repo) and the sorted source names."""
    names = sample_sources(dataset, sources)
    ordered = sorted(set(names))
    return [ordered.index(name) for name in names], ordered
