"""OOD detection details (issue 10): the pooling grid of the Mahalanobis features and the colour input check."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import encode, make_xray_array
from model.ood import (
    COLOURFUL_LIMIT, activation_score, colourfulness, fit_mahalanobis, mahalanobis_score, pooled_features,
)


def colour_photo(size=(160, 120)):
    """Stripes of saturated colour, like a photograph of anything but an X-ray."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for index, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200), (230, 200, 40)]):
        array[:, index * size[0] // 4:(index + 1) * size[0] // 4] = colour
    return Image.fromarray(array)


def test_pooled_features_on_a_grid_keep_the_layout():
    activations = torch.zeros(2, 3, 4, 4)
    activations[0, :, :2, :] = 1.0  # bright top half
    activations[1, :, :, :2] = 1.0  # the same image turned on its side: bright left half
    global_pool = pooled_features(activations, 1)
    grid_pool = pooled_features(activations, 2)
    assert global_pool.shape == (2, 3) and grid_pool.shape == (2, 12)
    assert torch.equal(global_pool[0], global_pool[1]), "a global pool cannot tell the two apart"
    assert not torch.equal(grid_pool[0], grid_pool[1])
    assert torch.allclose(global_pool, activations.mean(dim=(2, 3)))


def test_statistics_remember_their_grid():
    rng = np.random.default_rng(0)
    activations = torch.from_numpy(rng.normal(size=(90, 8, 4, 4)).astype(np.float32))
    targets = np.arange(90) % 3
    statistics = fit_mahalanobis(pooled_features(activations, 2).numpy(), targets, components=6, grid=2)
    assert statistics["grid"] == 2 and statistics["projection"].shape == (32, 6)
    expected = mahalanobis_score(statistics, pooled_features(activations, 2))
    assert np.allclose(activation_score(statistics, activations), expected)
    # Statistics from before the grid existed were fitted on the global pool.
    legacy = fit_mahalanobis(pooled_features(activations, 1).numpy(), targets, components=6)
    del legacy["grid"]
    assert np.allclose(activation_score(legacy, activations), mahalanobis_score(legacy, activations.mean(dim=(2, 3))))


def test_grid_statistics_flag_a_rotated_layout_that_the_global_pool_misses():
    """Features with a fixed layout (lungs upright); the same features turned 90 degrees are OOD on a grid only."""
    rng = np.random.default_rng(1)
    base = np.zeros((8, 4, 4), dtype=np.float32)
    base[:4, :2, :] = 3.0
    base[4:, 2:, :] = 3.0
    activations = torch.from_numpy(base[None] + rng.normal(0, 0.3, (120, 8, 4, 4)).astype(np.float32))
    rotated = torch.rot90(activations[:20], 1, dims=(2, 3))
    targets = np.arange(120) % 3
    scores = {}
    for grid in (1, 2):
        statistics = fit_mahalanobis(pooled_features(activations, grid).numpy(), targets, components=16, grid=grid)
        scores[grid] = (activation_score(statistics, activations[20:]).max(), activation_score(statistics, rotated).min())
    assert scores[1][1] < scores[1][0], "the global pool sees no difference"
    assert scores[2][1] > 2 * scores[2][0], "the 2 x 2 grid sees every rotated one"


def test_colourfulness_separates_photos_from_grayscale_and_tinted_xrays():
    xray = Image.fromarray(make_xray_array(3))
    assert colourfulness(xray) == 0.0
    assert colourfulness(xray.convert("RGB")) == pytest.approx(0.0, abs=1e-6)
    # A sepia-tinted scan of a film, with a small red marker arrow, is still an X-ray.
    sepia = np.stack([np.asarray(xray) * factor for factor in (1.0, 0.85, 0.65)], axis=-1).astype(np.uint8)
    sepia[10:30, 10:14] = (255, 0, 0)
    assert colourfulness(Image.fromarray(sepia)) < COLOURFUL_LIMIT
    assert colourfulness(colour_photo()) > 2 * COLOURFUL_LIMIT


def test_decoder_measures_colour_before_the_grayscale_conversion():
    from model.decode import decode_upload

    decoded = decode_upload(encode(colour_photo(), "JPEG", quality=90))
    assert decoded.image.mode == "L" and decoded.colourfulness > COLOURFUL_LIMIT
    assert decode_upload(encode(Image.fromarray(make_xray_array(4)))).colourfulness == 0.0


def test_api_flags_a_colour_photo_even_without_ood_statistics(client):
    response = client.post("/api/v1/predict", data={"file": (io.BytesIO(encode(colour_photo(), "JPEG")), "a.jpg")})
    assert response.status_code == 200
    ood = response.get_json()["ood"]
    assert ood["flagged"] is True and ood["score"] is None
    assert any("colour" in reason for reason in ood["reasons"])


def test_result_page_withholds_the_class_of_a_colour_photo_and_says_why(client):
    response = client.post("/predict", data={"file": (io.BytesIO(encode(colour_photo(), "PNG")), "a.png")},
                           content_type="multipart/form-data")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "No prediction" in page and "does not look like a frontal chest X-ray" in page
    assert "chest X-rays are grayscale" in page
    assert "Where the model looked" not in page


def test_noise_has_no_spatial_structure_and_xrays_do():
    from model.ood import STRUCTURE_LIMIT, neighbour_correlation

    rng = np.random.default_rng(0)
    uniform = Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))
    gaussian = Image.fromarray(np.clip(rng.normal(128, 40, (600, 600)), 0, 255).astype(np.uint8))
    assert neighbour_correlation(uniform) < 0.3 and neighbour_correlation(gaussian) < 0.3  # resampling adds a little
    xray = make_xray_array(8, size=(512, 512))
    noisy = np.clip(xray + rng.normal(0, 8, xray.shape), 0, 255).astype(np.uint8)  # the audit's sensor noise
    assert neighbour_correlation(Image.fromarray(noisy)) > STRUCTURE_LIMIT + 0.3
    assert neighbour_correlation(Image.new("L", (64, 64), 0)) == 1.0  # flat: the model decides


def test_api_flags_noise_even_without_ood_statistics(client):
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8))
    ood = client.post("/api/v1/predict", data={"file": (io.BytesIO(encode(noise)), "n.png")}).get_json()["ood"]
    assert ood["flagged"] is True and any("noise" in reason for reason in ood["reasons"])
