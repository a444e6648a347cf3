"""Start-up checks of a serving checkpoint, the same for the app and the PACS worker (no Flask here).

A deployment may pin the checkpoint file's SHA-256 (``COVIDSCAN_MODEL_SHA256``) and names the exact classes it
serves (``COVIDSCAN_ALLOWED_CLASS_NAMES``); the checkpoint's stored reference films must still give the answers
they gave at export (model/references.py). Any failure stops start-up with a reason, before a single image is
classified or a result written back to a PACS.
"""

import re

from model.errors import CheckpointError
from model.inference import Predictor, file_sha256
from model.references import verify_references

ENV_PREFIX = "COVIDSCAN"
# The product's classes, in the order the shipped model outputs them; another list needs ALLOWED_CLASS_NAMES.
PRODUCT_CLASS_NAMES = ("COVID", "NORMAL", "PNEUMONIA")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def parse_model_digest(value):
    """``COVIDSCAN_MODEL_SHA256``: the SHA-256 hex digest the checkpoint file must have, or empty (not pinned)."""
    digest = str(value or "").strip().lower()
    if digest and not SHA256_HEX.match(digest):
        raise RuntimeError(
            f"{ENV_PREFIX}_MODEL_SHA256 must be the checkpoint's SHA-256 hex digest (64 hex digits, as printed by "
            f"`sha256sum models/default.pt` or scripts/export.py); this one has {len(digest)} characters."
        )
    return digest


def parse_class_names(value):
    """``COVIDSCAN_ALLOWED_CLASS_NAMES``: the exact class list a checkpoint must have, comma-separated (or a list)."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise RuntimeError(
            f"{ENV_PREFIX}_ALLOWED_CLASS_NAMES must list at least two distinct class names separated by commas, "
            f"in the checkpoint's order, not {value!r}"
        )
    return names


def check_model_digest(path, pinned):
    """``RuntimeError`` when a digest is pinned and the file at ``path`` has another."""
    if not pinned:
        return
    actual = file_sha256(path)
    if actual != pinned:
        raise RuntimeError(
            f"CovidScan cannot start: the model checkpoint {path} has SHA-256 {actual}, but "
            f"{ENV_PREFIX}_MODEL_SHA256 pins {pinned}. The file is not the one this deployment was set up with; "
            f"restore that file, or update {ENV_PREFIX}_MODEL_SHA256 after checking the new one."
        )


def check_class_names(class_names, allowed):
    """``CheckpointError`` unless the checkpoint's class names are exactly ``allowed``, in that order."""
    if tuple(class_names) != tuple(allowed):
        raise CheckpointError(
            f"the checkpoint's class names are [{', '.join(class_names)}], but this server serves exactly "
            f"[{', '.join(allowed)}] in that order (a different order would put the wrong label on every answer); "
            f"for a model retrained on other classes set {ENV_PREFIX}_ALLOWED_CLASS_NAMES="
            f"{','.join(class_names)}"
        )


def load_checked_predictor(path, *, pinned_sha256="", allowed_class_names=PRODUCT_CLASS_NAMES, device="cpu",
                           backend=None):
    """A Predictor for the checkpoint at ``path`` that passed every check.

    Raises ``RuntimeError`` for a pinned digest that does not match, ``CheckpointError`` for an unreadable or
    foreign checkpoint, other class names or failed reference films, ``BackendError`` for a backend that cannot run.
    """
    check_model_digest(path, pinned_sha256)
    predictor = Predictor.from_path(path, device=device, backend=backend)
    check_class_names(predictor.class_names, allowed_class_names)
    verify_references(predictor)
    return predictor
