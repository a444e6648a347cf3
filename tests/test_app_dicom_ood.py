"""The app with DICOM uploads and with a model that has OOD statistics (issues 9 and 10)."""

import numpy as np
import pytest

from conftest import make_xray_array
from test_dicom import SECRETS, dicom_bytes


@pytest.fixture
def dicom_xray():
    return dicom_bytes(make_xray_array(11))


def test_api_accepts_dicom_and_shows_only_technical_fields(client, dicom_xray):
    response = client.post("/api/v1/predict", data={"file": (__import__("io").BytesIO(dicom_xray), "scan")})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["image"]["format"] == "DICOM" and body["image"]["modality"] == "DX"
    text = response.get_data(as_text=True)
    for secret in SECRETS:
        assert secret not in text


def test_form_shows_dicom_technical_fields_and_lateral_warning(client):
    import io

    data = dicom_bytes(make_xray_array(12), ViewPosition="LL")
    response = client.post("/predict", data={"file": (io.BytesIO(data), "study.dcm")},
                           content_type="multipart/form-data")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Modality" in page and "DX" in page and "lateral" in page.lower()
    for secret in SECRETS:
        assert secret not in page


def test_ct_dicom_is_refused_with_a_reason(client):
    import io

    data = dicom_bytes(make_xray_array(13), Modality="CT")
    response = client.post("/api/v1/predict", data={"file": (io.BytesIO(data), "ct.dcm")})
    assert response.status_code == 400
    assert "CT" in response.get_json()["error"]


@pytest.fixture
def ood_app(tiny_checkpoint_path, tmp_path):
    """An app whose checkpoint flags everything (threshold below any score)."""
    from app import create_app
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.ood import fit_mahalanobis

    checkpoint = load_checkpoint(tiny_checkpoint_path)
    rng = np.random.default_rng(0)
    checkpoint["ood"] = fit_mahalanobis(rng.normal(0, 1, (60, 512)), np.arange(60) % 3, components=8)
    checkpoint["ood"]["threshold"] = -1.0
    path = save_checkpoint(checkpoint, tmp_path / "ood.pt")
    return create_app({"TESTING": True, "SECRET_KEY": "x", "WTF_CSRF_ENABLED": False, "MODEL_PATH": str(path)})


def test_flagged_image_withholds_the_class_behind_show_anyway(ood_app, xray_png):
    import io

    client = ood_app.test_client()
    response = client.post("/predict", data={"file": (io.BytesIO(xray_png), "x.png")},
                           content_type="multipart/form-data")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "No prediction" in page and "does not look like a frontal chest X-ray" in page
    assert "<details" in page and "Show the model" in page
    assert "Where the model looked" not in page
    api = client.post("/api/v1/predict", data={"file": (io.BytesIO(xray_png), "x.png")}).get_json()
    assert api["ood"]["flagged"] is True and api["ood"]["threshold"] == -1.0
    assert set(api["probabilities"]) == {"COVID", "NORMAL", "PNEUMONIA"}
