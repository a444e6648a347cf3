"""Reference inputs stored in a serving checkpoint at export and re-run at start-up (swapped labels, broken weights).

At export, for each class the validation film that the model gives that class with the highest probability is
stored as its preprocessed tensor (float16; one channel when the transform replicates grayscale) together with the
calibrated probabilities the exported weights give it, keyed by class name. At start-up the server runs them again
and refuses the checkpoint when a top class differs or a probability moves by more than ``TOLERANCE`` — loose
enough for a quantised or ONNX fast path, far tighter than a label swap or damaged weights.
"""

import logging
from pathlib import Path

import torch

from model.errors import CheckpointError

logger = logging.getLogger(__name__)

REFERENCES_KEY = "references"
TOLERANCE = 0.03
NO_REFERENCES_WARNING = (
    "the checkpoint holds no reference inputs, so its class names and weights cannot be checked at start-up; "
    "export it with `scripts/export.py --calibrate DATA` (or add them with `--references DATA`)"
)


def build_references(checkpoint, data_dir, *, batch_size=32, workers=2, progress=True):
    """``{class name: {"input", "probabilities"}}`` for a serving checkpoint (float32 or float16 weights).

    For each class, the film of ``data_dir`` (an ImageFolder split, e.g. DATA/val) with the highest calibrated
    probability of that class; its expected probabilities come from the checkpoint's own weights, eager float32,
    run on the stored (float16-rounded) input.
    """
    from model.checkpoint import build_model_from_checkpoint
    from model.evaluation import split_outputs
    from model.metrics import softmax
    from model.runtime import FeatureNetwork
    from model.decode import decode_upload
    from model.transforms import build_eval_transform

    checkpoint = with_float32_weights(checkpoint)
    class_names = list(checkpoint["class_names"])
    temperature = float(checkpoint.get("temperature", 1.0))
    logits, _, _, paths = split_outputs(checkpoint, Path(data_dir), batch_size=batch_size, workers=workers,
                                        progress=progress)
    probabilities = softmax(logits, temperature)
    if len(paths) == 0:
        raise CheckpointError(f"no images in {data_dir} to choose reference inputs from")
    transform = build_eval_transform(checkpoint["transform"])
    network = FeatureNetwork(build_model_from_checkpoint(checkpoint)).eval()
    references = {}
    for index, class_name in enumerate(class_names):
        best = int(probabilities[:, index].argmax())
        tensor = transform(decode_upload(Path(paths[best]).read_bytes()).image)
        stored = store_input(tensor, checkpoint["transform"])
        with torch.inference_mode():
            reference_logits, _ = network(restore_input(stored, checkpoint["transform"]))
        expected = torch.softmax(reference_logits.float() / temperature, dim=1)[0].tolist()
        references[class_name] = {
            "input": stored,
            "probabilities": {name: float(value) for name, value in zip(class_names, expected)},
        }
        logger.info("reference for %s: a %s film, top class %s %.3f", class_name,
                    Path(paths[best]).parent.name, class_names[int(torch.tensor(expected).argmax())], max(expected))
    return references


def store_input(tensor, transform_params):
    """A preprocessed C x H x W tensor as float16, keeping one channel when all channels hold the same grayscale."""
    tensor = tensor.detach().float().cpu()
    if tensor.shape[0] > 1 and torch.allclose(restore_channels(tensor[:1], transform_params), tensor, atol=1e-4):
        tensor = tensor[:1]
    return tensor.half().contiguous()


def restore_input(stored, transform_params):
    """The batch of one that ``store_input`` stored (float32, every channel of the transform)."""
    tensor = stored.float()
    if tensor.shape[0] == 1 and int(transform_params["channels"]) > 1:
        tensor = restore_channels(tensor, transform_params)
    return tensor.unsqueeze(0)


def restore_channels(first_channel, transform_params):
    """Every channel of a normalised grayscale tensor from its first: undo channel 0's normalisation, redo each."""
    mean = torch.tensor(transform_params["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(transform_params["std"], dtype=torch.float32).view(-1, 1, 1)
    grey = first_channel * std[0] + mean[0]
    return (grey - mean) / std


def verify_references(predictor, *, tolerance=TOLERANCE):
    """Run a predictor's stored references through its runtime; ``CheckpointError`` naming every mismatch.

    Returns the number of references checked (0, with a logged warning, for a checkpoint that has none).
    """
    references = predictor.checkpoint.get(REFERENCES_KEY)
    if not references:
        logger.warning("%s", NO_REFERENCES_WARNING)
        return 0
    problems = []
    for reference_name, reference in references.items():
        expected = dict(reference["probabilities"])
        if sorted(expected) != sorted(predictor.class_names):
            problems.append(f"the reference for {reference_name} expects classes {', '.join(expected)}, "
                            f"but the checkpoint names {', '.join(predictor.class_names)}")
            continue
        logits, _ = predictor.forward(restore_input(reference["input"], predictor.transform_params))
        answer = dict(zip(predictor.class_names, predictor.probabilities_from_logits(logits)[0].tolist()))
        expected_top = max(expected, key=expected.get)
        answer_top = max(answer, key=answer.get)
        worst = max(predictor.class_names, key=lambda name: abs(answer[name] - expected[name]))
        difference = abs(answer[worst] - expected[worst])
        if answer_top != expected_top:
            problems.append(f"the reference film for {reference_name} now comes out {answer_top} "
                            f"{answer[answer_top]:.3f}, but was {expected_top} {expected[expected_top]:.3f} at export")
        elif difference > tolerance:
            problems.append(f"the reference film for {reference_name} now gives {worst} {answer[worst]:.3f}, "
                            f"but {expected[worst]:.3f} at export (more than {tolerance} apart)")
    if problems:
        raise CheckpointError(
            "the checkpoint fails its reference check: " + "; ".join(problems) + ". Its class names, weights or "
            "preprocessing are not those it was exported with (swapped labels or damaged weights); use the file "
            "written by scripts/export.py"
        )
    logger.info("reference check passed: %d reference input(s), within %.2f of the exported probabilities",
                len(references), tolerance)
    return len(references)


def with_float32_weights(checkpoint):
    """The checkpoint with float32 weights (a ``--half`` serving checkpoint stores float16)."""
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in checkpoint["state_dict"].items()}
    return {**checkpoint, "state_dict": state}
