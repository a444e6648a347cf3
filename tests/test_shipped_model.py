"""The shipped default model: format, size, and accuracy on real test X-rays (needs ../shared/data/cxr)."""

import functools
import json
import random

import pytest
import torch

from conftest import REPO_ROOT, SHARED_DATA

SHIPPED_MODEL = REPO_ROOT / "models" / "default.pt"
MODEL_CARD_METRICS = REPO_ROOT / "docs" / "model" / "test_metrics.json"


def test_shipped_model_format_and_size():
    checkpoint = torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)
    assert checkpoint["arch"] == "resnet152"
    assert checkpoint["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert "temperature" in checkpoint and "ood" in checkpoint
    assert SHIPPED_MODEL.stat().st_size <= 125 * 2**20


@pytest.mark.needs_shared_data
@pytest.mark.slow
def test_shipped_model_predicts_real_test_images_as_the_card_claims():
    """A seeded sample of 90 test images through the app's normal path; accuracy within noise of the card."""
    from app import create_app

    app = create_app({"TESTING": True, "SECRET_KEY": "test", "MODEL_PATH": str(SHIPPED_MODEL), "RATE_LIMIT": "off"})
    client = app.test_client()
    claimed = json.loads(MODEL_CARD_METRICS.read_text())["accuracy"]
    rng = random.Random(0)
    samples = []
    for class_name in ("COVID", "NORMAL", "PNEUMONIA"):
        files = sorted((SHARED_DATA / "test" / class_name).iterdir())
        samples.extend((path, class_name) for path in rng.sample(files, 30))
    correct = 0
    for path, class_name in samples:
        response = client.post("/api/v1/predict", data={"file": (path.open("rb"), "x.jpg")})
        assert response.status_code == 200, response.get_json()
        correct += response.get_json()["label"] == class_name
    accuracy = correct / len(samples)
    # 90 images: the binomial standard error near 0.9 is ~0.03; allow three of them.
    assert accuracy >= claimed - 0.10, (accuracy, claimed)


@pytest.mark.needs_shared_data
@pytest.mark.slow
def test_real_xray_wrapped_as_dicom_gets_the_same_answer():
    """A real test X-ray as PNG and as three kinds of DICOM: same class, probabilities within 0.02 (issue 9)."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.uid import RLELossless

    from app import create_app
    from test_dicom import SECRETS, make_dataset, to_bytes

    app = create_app({"TESTING": True, "SECRET_KEY": "test", "MODEL_PATH": str(SHIPPED_MODEL), "RATE_LIMIT": "off"})
    client = app.test_client()
    path = sorted((SHARED_DATA / "test" / "COVID").iterdir())[0]
    pixels = np.asarray(Image.open(path).convert("L"))

    def predict(data, name):
        response = client.post("/api/v1/predict", data={"file": (io.BytesIO(data), name)})
        assert response.status_code == 200, response.get_json()
        for secret in SECRETS:
            assert secret not in response.get_data(as_text=True)
        return response.get_json()

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    reference = predict(buffer.getvalue(), "x.png")
    # MONOCHROME1, 12 bits stored in 16: inverted and scaled pixels, undone by rescale, window and inversion.
    stored = (4095 - (pixels.astype(np.uint16) * 16)).astype(np.uint16)
    monochrome1 = make_dataset(stored, photometric="MONOCHROME1", bits_stored=12, RescaleSlope=2,
                               RescaleIntercept=-1000, WindowCenter=3095, WindowWidth=8190)
    rle = make_dataset(pixels)
    rle.compress(RLELossless)
    variants = {
        "MONOCHROME2 8-bit": to_bytes(make_dataset(pixels)),
        "MONOCHROME1 16-bit": to_bytes(monochrome1),
        "RLE lossless": to_bytes(rle),
    }
    for name, data in variants.items():
        answer = predict(data, "scan")
        assert answer["label"] == reference["label"], name
        for class_name, probability in reference["probabilities"].items():
            assert abs(answer["probabilities"][class_name] - probability) <= 0.02, (name, class_name)
    ct = client.post("/api/v1/predict", data={"file": (io.BytesIO(to_bytes(make_dataset(pixels, Modality="CT"))), "ct")})
    assert ct.status_code == 400 and "CT" in ct.get_json()["error"]


def _png(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _not_chest_xrays():
    """Photos, CT/MR slices saved as PNG and noise images, as a user might upload them by mistake (issue 10)."""
    import numpy as np
    import pydicom
    import skimage.data
    from PIL import Image
    from pydicom.data import get_testdata_file

    uploads = {}
    for name in ("astronaut", "camera", "coffee", "chelsea", "moon"):
        uploads[f"photo {name}"] = _png(Image.fromarray(getattr(skimage.data, name)()))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        pixels = pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float64)
        scaled = (255 * (pixels - pixels.min()) / (pixels.max() - pixels.min())).astype(np.uint8)
        uploads[f"{name} as PNG"] = _png(Image.fromarray(scaled))
        uploads[f"{name} as PNG, 512 px"] = _png(Image.fromarray(scaled).resize((512, 512), Image.BICUBIC))
    rng = np.random.default_rng(0)
    uploads["uniform noise"] = _png(Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)))
    uploads["gaussian noise 512 px"] = _png(Image.fromarray(
        np.clip(rng.normal(128, 40, (512, 512)), 0, 255).astype(np.uint8)))
    uploads["colour noise"] = _png(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)))
    return uploads


@pytest.fixture(scope="module")
def shipped_client():
    from app import create_app

    app = create_app({"TESTING": True, "SECRET_KEY": "test", "MODEL_PATH": str(SHIPPED_MODEL), "RATE_LIMIT": "off"})
    return app.test_client()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_not_chest_xrays()))
def test_shipped_model_flags_what_is_not_a_chest_xray(shipped_client, name):
    import io

    response = shipped_client.post("/api/v1/predict", data={"file": (io.BytesIO(_not_chest_xrays()[name]), "x.png")})
    assert response.status_code == 200, response.get_json()
    ood = response.get_json()["ood"]
    assert ood["flagged"] is True, ood


@pytest.mark.needs_shared_data
@pytest.mark.slow
def test_shipped_model_flags_at_most_2_of_50_real_test_xrays(shipped_client):
    rng = random.Random(10)
    paths = sorted(path for path in (SHARED_DATA / "test").rglob("*") if path.is_file())
    flagged = []
    for path in rng.sample(paths, 50):
        response = shipped_client.post("/api/v1/predict", data={"file": (path.open("rb"), "x.png")})
        assert response.status_code == 200, response.get_json()
        if response.get_json()["ood"]["flagged"]:
            flagged.append(path.name)
    assert len(flagged) <= 2, flagged


SHIPPED_FAST_PATH = REPO_ROOT / "models" / "default.int8.onnx"


def _skip_without_int8_instructions():
    from model.runtime import cpu_int8_support

    supported, reason = cpu_int8_support()
    if not supported:
        pytest.skip(f"the int8 fast path is not the default here: {reason}")


def test_shipped_fast_path_belongs_to_the_shipped_model():
    """models/default.int8.onnx was quantized from models/default.pt as committed (a retrain must re-export it)."""
    from model.inference import file_sha256
    from model.quantize import fast_path_path, read_fast_path_metadata

    assert fast_path_path(SHIPPED_MODEL) == SHIPPED_FAST_PATH
    metadata = read_fast_path_metadata(SHIPPED_FAST_PATH)
    assert metadata["checkpoint_sha256"] == file_sha256(SHIPPED_MODEL)
    assert metadata["model_version"] == torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)["model_version"]
    agreement = json.loads(metadata["calibration_agreement"])
    assert agreement["check_films_held_out"] and agreement["max_probability_difference"] <= 0.03
    assert SHIPPED_FAST_PATH.stat().st_size <= 80 * 2**20


@functools.cache
def _shipped_predictor(backend):
    from model.inference import Predictor

    return Predictor.from_path(SHIPPED_MODEL, backend=backend)


@pytest.mark.slow
def test_shipped_fast_path_flags_what_float32_flags():
    """Every non-X-ray upload is flagged on both paths (the OOD verdict survives quantization)."""
    _skip_without_int8_instructions()
    for name, upload in _not_chest_xrays().items():
        for backend in ("onnx", "int8"):
            assert _shipped_predictor(backend).predict_bytes(upload, with_heatmap=False).ood["flagged"], (name, backend)


@pytest.mark.needs_shared_data
@pytest.mark.slow
def test_shipped_fast_path_answers_like_float32_on_real_films():
    """60 seeded test films: same class, probabilities within 0.03, OOD verdicts alike, heatmaps alike."""
    from model.cam import class_activation_maps
    from model.decode import decode_upload

    _skip_without_int8_instructions()
    rng = random.Random(35)
    paths = rng.sample(sorted(path for path in (SHARED_DATA / "test").rglob("*") if path.is_file()), 60)
    reference, fast = _shipped_predictor("onnx"), _shipped_predictor("int8")
    batch = torch.cat([reference.preprocess(decode_upload(path.read_bytes()).image) for path in paths])
    (logits, features), (fast_logits, fast_features) = reference.forward(batch), fast.forward(batch)
    expected, answer = reference.probabilities_from_logits(logits), fast.probabilities_from_logits(fast_logits)
    assert torch.equal(expected.argmax(1), answer.argmax(1))
    assert (expected - answer).abs().max() <= 0.03
    # OOD: int8 activations score ~1 % higher on average (2 % at most here), so a film can only change verdict when
    # its float32 score lies within 3 % of the threshold; everywhere else the verdicts are the same.
    verdicts = [predictor.ood_check(activations) for predictor, activations in ((reference, features),
                                                                                 (fast, fast_features))]
    threshold = verdicts[0][0]["threshold"]
    for expected_verdict, verdict in zip(*verdicts):
        assert abs(verdict["score"] - expected_verdict["score"]) <= 0.03 * expected_verdict["score"]
        if verdict["flagged"] != expected_verdict["flagged"]:
            assert abs(expected_verdict["score"] - threshold) <= 0.03 * threshold, (expected_verdict, verdict)
    classes = expected.argmax(1)
    cams = [torch.from_numpy(class_activation_maps(activations, reference.network.fc.weight, classes)).flatten(1)
            for activations in (features, fast_features)]
    correlations = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(*cams)]
    assert min(correlations) > 0.9, min(correlations)
