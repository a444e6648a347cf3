"""The int8 fast path: a serving checkpoint's network as a statically quantized ONNX file (an export step).

ONNX Runtime's own quantizer (``onnxruntime.quantization.quantize_static``) writes a QDQ model: int8 weights, one
scale per output channel, and uint8 activations whose ranges are calibrated on validation films run through the
checkpoint's own eval transform. The file sits beside the checkpoint (``models/default.pt`` ->
``models/default.int8.onnx``) and records the SHA-256 of the checkpoint it came from, so that start-up neither
quantizes nor exports, and a file left over from another checkpoint is never used (model/runtime.py).
"""

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from model.errors import CheckpointError

logger = logging.getLogger(__name__)

FAST_PATH_SUFFIX = ".int8.onnx"
METADATA_PREFIX = "covidscan."
CALIBRATION_FILMS = 300  # val films whose activation ranges set the int8 scales
CALIBRATION_BATCH = 10  # films per calibration step; the range is the mean of the steps' minima and maxima
CHECK_FILMS = 300  # further val films, not used for calibration, on which the export checks the answers
# Modules left in float32. Quantizing the stem and layer1 cost the most agreement for the least time (measured by
# leaving one stage at a time in float32: docs/model/fast-path.md); the classifier's 2048 x 3 weights cost nothing.
FLOAT_MODULES = ("conv1", "layer1", "fc")
# The export refuses a file whose answers on held-out val films drift further than this from float32 (the product's
# promise: the same answers on either path).
MAX_PROBABILITY_DIFFERENCE = 0.03
MIN_TOP1_AGREEMENT = 0.99


def fast_path_path(checkpoint_path):
    """Where the int8 file of a checkpoint lives: ``models/default.pt`` -> ``models/default.int8.onnx``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + FAST_PATH_SUFFIX)


def read_fast_path_metadata(source):
    """The ``covidscan.*`` metadata of an int8 file (its path or its bytes), as a dict without the prefix."""
    import onnx

    model = onnx.load_model_from_string(source if isinstance(source, bytes) else Path(source).read_bytes())
    return {entry.key[len(METADATA_PREFIX):]: entry.value for entry in model.metadata_props
            if entry.key.startswith(METADATA_PREFIX)}


def calibration_films(val_dir, *, limit=CALIBRATION_FILMS, seed=0):
    """Up to ``limit`` films of an ImageFolder split, the same share from each class folder, in a fixed order."""
    from model.data import IMAGE_EXTENSIONS

    val_dir = Path(val_dir)
    classes = sorted(folder for folder in val_dir.iterdir() if folder.is_dir()) if val_dir.is_dir() else []
    per_class = [sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
                 for folder in classes]
    per_class = [paths for paths in per_class if paths]
    if not per_class:
        raise CheckpointError(f"no films in {val_dir} to calibrate the int8 fast path on")
    rng = random.Random(seed)
    for paths in per_class:
        rng.shuffle(paths)
    films = []
    while len(films) < limit and any(per_class):
        for paths in per_class:
            if paths and len(films) < limit:
                films.append(paths.pop())
    return films


def preprocess_films(predictor, paths):
    """The eval-transformed films as one float32 array (N x C x H x W)."""
    from model.decode import decode_upload

    return np.concatenate([predictor.preprocess(decode_upload(Path(path).read_bytes()).image).numpy()
                           for path in paths])


def quantize_checkpoint(predictor, val_dir, output, *, limit=CALIBRATION_FILMS, check=CHECK_FILMS):
    """Write the int8 fast-path file of ``predictor``'s network to ``output``; returns a report dict.

    The float32 export, ONNX Runtime's pre-processing (shape inference, graph optimisation) and the quantized model
    are built in a temporary folder. The report holds the agreement with float32 (top-1 agreement, largest
    probability difference) on up to ``check`` further val films that the calibration did not see (on the
    calibration films themselves when the split has no others). A model that misses ``MIN_TOP1_AGREEMENT`` or
    ``MAX_PROBABILITY_DIFFERENCE`` raises ``CheckpointError`` and nothing is written; ``output`` appears only once
    it is complete and checked. It records ``predictor.sha256``, the checkpoint it belongs to.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from model.runtime import _quiet_loggers, _write_atomically, export_onnx

    chosen = calibration_films(val_dir, limit=limit + check)
    films, held_out = chosen[:limit], chosen[limit:]
    logger.info("int8 fast path: calibrating on %d films of %s, checking on %d others", len(films), val_dir,
                len(held_out))
    inputs = preprocess_films(predictor, films)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(inputs):
                return None
            batch = inputs[self.start:self.start + CALIBRATION_BATCH]
            self.start += CALIBRATION_BATCH
            return {"images": batch}

    params = predictor.transform_params
    example = torch.zeros(1, params["channels"], params["crop_size"], params["crop_size"])
    with tempfile.TemporaryDirectory(prefix="covidscan-int8-") as folder:
        folder = Path(folder)
        export_onnx(predictor.network, example, folder / "float32.onnx")
        with _quiet_loggers("root"):
            quant_pre_process(str(folder / "float32.onnx"), str(folder / "prepared.onnx"))
        prepared = onnx.load(str(folder / "prepared.onnx"))
        quantize_static(
            str(folder / "prepared.onnx"), str(folder / "int8.onnx"), Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=float_node_names(prepared, FLOAT_MODULES),
            extra_options={"CalibMovingAverage": True},
        )
        float_model = (folder / "prepared.onnx").read_bytes()
        model = onnx.load(str(folder / "int8.onnx"))
    check_inputs = preprocess_films(predictor, held_out) if held_out else inputs
    agreement = compare_models(float_model, model.SerializeToString(), check_inputs, predictor.temperature)
    agreement["check_films"] = len(check_inputs)
    agreement["check_films_held_out"] = bool(held_out)
    if (agreement["max_probability_difference"] > MAX_PROBABILITY_DIFFERENCE
            or agreement["top1_agreement"] < MIN_TOP1_AGREEMENT):
        raise CheckpointError(
            f"the int8 model's answers on {len(check_inputs)} val films drift from float32 (top-1 agreement "
            f"{agreement['top1_agreement']:.3f}, at least {MIN_TOP1_AGREEMENT}; largest probability difference "
            f"{agreement['max_probability_difference']:.3f}, at most {MAX_PROBABILITY_DIFFERENCE}); nothing written "
            f"to {output}")
    metadata = {
        "checkpoint_sha256": predictor.sha256 or "",
        "model_version": str(predictor.model_info["version"]),
        "quantization": "onnxruntime quantize_static QDQ: int8 weights per channel, uint8 activations, MinMax "
                        f"ranges averaged over batches of {CALIBRATION_BATCH}; float32 modules: "
                        f"{', '.join(FLOAT_MODULES)}",
        "calibration_films": str(len(films)),
        "calibration_agreement": json.dumps(agreement),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    _write_atomically(model.SerializeToString(), output)
    return {"output": str(output), "films": len(films), **agreement}


def float_node_names(model, modules):
    """Names of the Conv/Gemm nodes whose weights belong to ``modules`` (``fc``, ``conv1``, ``layer1``...).

    The exporter names each weight after its module (``network.layer1.0.conv1.weight``), which survives batch-norm
    folding, so a node is found by its weight, not by its generated name.
    """
    weights = {node.name: node.input[1] for node in model.graph.node
               if node.op_type in ("Conv", "Gemm") and len(node.input) > 1}
    prefixes = {module: f"network.{module}." for module in modules}
    missing = [module for module, prefix in prefixes.items()
               if not any(weight.startswith(prefix) for weight in weights.values())]
    if missing:
        raise CheckpointError(f"the exported graph has no weights of {', '.join(missing)} to keep in float32")
    return [name for name, weight in weights.items() if weight.startswith(tuple(prefixes.values()))]


def compare_models(float_bytes, int8_bytes, inputs, temperature, *, batch_size=10):
    """Top-1 agreement and largest probability difference between two ONNX models on preprocessed inputs."""
    from model.runtime import _open_onnx_session

    probabilities = []
    for data in (float_bytes, int8_bytes):
        session = _open_onnx_session(data, threads=torch.get_num_threads())
        logits = np.concatenate([session.run(["logits"], {"images": inputs[start:start + batch_size]})[0]
                                 for start in range(0, len(inputs), batch_size)])
        probabilities.append(torch.softmax(torch.from_numpy(logits) / temperature, dim=1).numpy())
    reference, fast = probabilities
    difference = np.abs(reference - fast).max(axis=1)
    return {
        "top1_agreement": float((reference.argmax(1) == fast.argmax(1)).mean()),
        "max_probability_difference": float(difference.max()),
        "mean_probability_difference": float(difference.mean()),
    }
