"""Inference backends agree with eager PyTorch and return the activations the heatmap and the OOD score need."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_xray_array
from model import runtime
from model.errors import CovidScanError

# bfloat16 keeps 8 bits of mantissa and int8 256 levels: on random weights both are only checked loosely here
# (the shipped model's int8 file is held to 0.03 by tests/test_shipped_model.py and benchmarks/bench_fast_path.py)
TOLERANCE = {"bf16": 0.1, "int8": 0.1}
DEFAULT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def predictors(tiny_checkpoint_path, tiny_int8_checkpoint_path):
    """One Predictor per backend around the tiny checkpoint (built once: the ONNX export takes seconds)."""
    from model.inference import Predictor

    return {name: Predictor.from_path(tiny_int8_checkpoint_path if name == "int8" else tiny_checkpoint_path,
                                      backend=name)
            for name in runtime.BACKENDS}


@pytest.fixture(scope="module")
def batch(predictors):
    """Five preprocessed synthetic X-rays of all three classes."""
    eager = predictors["eager"]
    labels = ["COVID", "NORMAL", "PNEUMONIA", None, "COVID"]
    images = [Image.fromarray(make_xray_array(seed, label=label), mode="L") for seed, label in enumerate(labels)]
    return torch.cat([eager.preprocess(image) for image in images])


@pytest.mark.parametrize("name", runtime.BACKENDS)
@pytest.mark.parametrize("size", [1, 5])
def test_backend_agrees_with_eager(predictors, batch, name, size):
    eager, candidate = predictors["eager"], predictors[name]
    reference_logits, reference_activations = eager.forward(batch[:size])
    logits, activations = candidate.forward(batch[:size])
    assert candidate.backend == name
    assert logits.shape == reference_logits.shape == (size, 3)
    assert activations.shape == reference_activations.shape == (size, 512, 2, 2)  # resnet18 layer4 at 64 px
    assert logits.dtype == activations.dtype == torch.float32
    probabilities = candidate.probabilities_from_logits(logits)
    reference = eager.probabilities_from_logits(reference_logits)
    tolerance = TOLERANCE.get(name, DEFAULT_TOLERANCE)
    assert torch.isfinite(probabilities).all()
    assert (probabilities - reference).abs().max() <= tolerance
    if name not in TOLERANCE:
        assert torch.equal(probabilities.argmax(1), reference.argmax(1))
        assert torch.allclose(activations, reference_activations, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", runtime.BACKENDS)
def test_every_runtime_has_a_name_and_a_prepare_hook(predictors, name):
    assert predictors[name].runtime.name == name
    assert predictors[name].runtime.prepare() is None


@pytest.mark.parametrize("name", runtime.BACKENDS)
def test_activations_are_the_last_block_that_feeds_the_head(predictors, batch, name):
    """The pooled activations through ``fc`` give back the logits: they are what CAM and OOD must see."""
    predictor = predictors[name]
    logits, activations = predictor.forward(batch)
    with torch.inference_mode():
        rebuilt = predictor.network.fc(activations.mean(dim=(2, 3)))
    tolerance = 0.05 if name in TOLERANCE else 1e-4
    assert torch.allclose(rebuilt, logits, atol=tolerance * max(1.0, float(logits.abs().max())))


def test_eager_backend_matches_the_hooked_network(predictors, batch):
    from model.cam import ActivationRecorder

    eager = predictors["eager"]
    recorder = ActivationRecorder(eager.network)
    try:
        with torch.inference_mode():
            plain_logits = eager.network(batch)
        logits, activations = eager.forward(batch)
    finally:
        recorder.remove()
    assert torch.equal(logits, plain_logits)
    assert torch.equal(activations, recorder.activations)


@pytest.mark.parametrize("name", runtime.BACKENDS)
def test_predict_bytes_gives_label_heatmap_and_ood_with_every_backend(predictors, xray_png, name, monkeypatch):
    from model.ood import fit_mahalanobis

    predictor = predictors[name]
    features = np.random.default_rng(0).normal(size=(60, 512))
    statistics = fit_mahalanobis(features, np.arange(60) % 3, components=8)
    statistics["threshold"] = 1e9
    monkeypatch.setattr(predictor, "ood_statistics", statistics)
    monkeypatch.setattr(predictors["eager"], "ood_statistics", statistics)
    prediction = predictor.predict_bytes(xray_png, with_heatmap=True)
    reference = predictors["eager"].predict_bytes(xray_png, with_heatmap=False)
    assert prediction.label == reference.label or name in TOLERANCE
    assert prediction.heatmap is not None and prediction.heatmap.size == (256, 256)
    assert prediction.ood["flagged"] is False
    relative = abs(prediction.ood["score"] - reference.ood["score"]) / max(1.0, reference.ood["score"])
    assert relative < (0.1 if name in TOLERANCE else 1e-3)


def test_default_backend_is_measured_one_and_environment_can_force_eager(tiny_checkpoint_path, monkeypatch):
    from model.inference import Predictor

    monkeypatch.delenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, raising=False)
    assert runtime.resolve_backend(None) == runtime.DEFAULT_BACKEND
    assert runtime.resolve_backend("auto") == runtime.DEFAULT_BACKEND
    assert runtime.resolve_backend(None, device="cuda") == "eager"
    monkeypatch.setenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, "eager")
    assert runtime.resolve_backend(None) == "eager"
    assert Predictor.from_path(tiny_checkpoint_path).backend == "eager"
    assert runtime.resolve_backend("bf16") == "bf16"  # an explicit argument wins


@pytest.mark.parametrize(
    ("backend", "device", "message"),
    [
        ("tensorrt", "cpu", "unknown inference backend 'tensorrt'"),
        ("torchscript", "cpu", "unknown inference backend 'torchscript'"),  # measured, then dropped
        ("onnx", "cuda", "runs on the CPU only"),
    ],
)
def test_bad_backend_names_are_refused_clearly(backend, device, message):
    with pytest.raises(runtime.BackendError, match=message):
        runtime.resolve_backend(backend, device=device)
    assert issubclass(runtime.BackendError, CovidScanError)


def test_bad_backend_in_the_environment_stops_start_up(tiny_checkpoint_path, monkeypatch):
    from model.inference import Predictor

    monkeypatch.setenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, "fastest")
    with pytest.raises(runtime.BackendError, match="unknown inference backend 'fastest'"):
        Predictor.from_path(tiny_checkpoint_path)


def test_default_falls_back_to_eager_but_a_requested_backend_must_build(tiny_checkpoint_path, monkeypatch, caplog):
    from model.inference import Predictor

    def broken(*args, **kwargs):
        raise RuntimeError("no kernels for this CPU")

    monkeypatch.delenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(runtime, "DEFAULT_BACKEND", "bf16")
    monkeypatch.setattr(runtime.Bfloat16Runtime, "__init__", broken)
    assert Predictor.from_path(tiny_checkpoint_path).backend == "eager"
    assert "could not be built: RuntimeError: no kernels for this CPU" in caplog.text
    with pytest.raises(runtime.BackendError, match="'bf16' could not be built"):
        Predictor.from_path(tiny_checkpoint_path, backend="bf16")


def test_onnx_session_follows_the_thread_count(predictors, batch):
    onnx_runtime = predictors["onnx"].runtime
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = onnx_runtime.session()
        assert onnx_runtime.session() is single
        torch.set_num_threads(2)
        onnx_runtime.prepare()  # what a gunicorn post_fork hook would call
        assert onnx_runtime._session is not single
        assert onnx_runtime.session() is onnx_runtime._session
        logits, _ = onnx_runtime(batch)
        assert logits.shape == (5, 3)
    finally:
        torch.set_num_threads(threads)


def test_fold_batch_norm_keeps_the_outputs():
    from model.network import build_model

    torch.manual_seed(1)
    network = build_model("resnet18", num_classes=3).eval()
    for module in network.modules():  # non-trivial statistics, so folding has something to get wrong
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = network(images)
        folded = runtime.fold_batch_norm(network)
        assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
        assert torch.allclose(folded(images), expected, rtol=1e-4, atol=1e-4)


def test_export_script_writes_an_onnx_model_that_matches_eager(tiny_checkpoint_path, tmp_path, predictors, batch):
    import onnxruntime

    from scripts.export import get_args_parser, main

    onnx_path = tmp_path / "model.onnx"
    main(get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint_path), "--output", str(tmp_path / "serving.pt"), "--onnx", str(onnx_path)]
    ))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [each.name for each in session.get_inputs()] == ["images"]
    logits, features = session.run(["logits", "features"], {"images": batch.numpy()})
    reference_logits, reference_features = predictors["eager"].forward(batch)
    assert np.allclose(logits, reference_logits.numpy(), atol=1e-4)
    assert features.shape == tuple(reference_features.shape)


def test_onnx_export_failure_is_a_backend_error(tiny_checkpoint_path, monkeypatch):
    from model.checkpoint import load_checkpoint
    from model.inference import Predictor

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(runtime.BackendError, match="'onnx' could not be built: RuntimeError: unsupported operator"):
        Predictor(load_checkpoint(tiny_checkpoint_path), backend="onnx")  # no sha256, so no cached export


def test_onnx_export_leaves_the_network_unchanged(predictors, batch):
    """The export traces the Predictor's own network (no copy); its weights and outputs must not move."""
    with torch.inference_mode():
        exported_network_logits = predictors["onnx"].network(batch)
        eager_logits = predictors["eager"].network(batch)
    assert torch.equal(exported_network_logits, eager_logits)
    assert predictors["onnx"].network.training is False
