"""Unit tests of the model package: network building, weights, decoding, transforms, checkpoints, CAM."""


import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from conftest import CLASS_NAMES, encode, make_xray_array
from model.checkpoint import (
    build_model_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    to_serving,
)
from model.errors import CheckpointError, InvalidImageError, UnsupportedImageError, WeightsError
from model.decode import decode_image
from model.inference import Predictor
from model.network import build_model
from model.transforms import (
    TrimBorders,
    TwoViews,
    batch_mixing,
    build_eval_transform,
    build_train_transform,
    content_box,
    eval_transform_params,
    mix_views,
    seen_box,
)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_build_model_has_new_head(arch):
    network = build_model(arch, num_classes=3)
    assert network.fc.out_features == 3
    assert network(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_freeze_backbone_trains_only_the_head():
    network = build_model("resnet18", num_classes=3, freeze_backbone=True)
    trainable = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg16")


def test_local_weights_load_backbone(tmp_path):
    source = torchvision.models.resnet18()  # ImageNet-shaped head (1000 classes)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    network = build_model("resnet18", num_classes=3, weights=str(path))
    assert torch.equal(network.conv1.weight, source.conv1.weight)
    assert network.fc.out_features == 3


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"not a state dict", "not a PyTorch state dict"),
        ("resnet34", "does not match resnet18"),
    ],
)
def test_bad_local_weights_give_clear_error(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "resnet34":
        torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(WeightsError, match=message):
        build_model("resnet18", num_classes=3, weights=str(path))


def test_decode_accepts_png_and_jpeg(xray_png, xray_jpeg):
    assert decode_image(xray_png).mode == "L"
    assert decode_image(xray_jpeg).size == (320, 256)


@pytest.mark.parametrize(
    "mode",
    ["RGB", "RGBA", "P", "LA", "CMYK", "I;16"],
)
def test_decode_converts_modes_to_grayscale(mode):
    array = make_xray_array(3)
    if mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16) * 256)
        assert image.mode.startswith("I;16")
    else:
        image = Image.fromarray(array, mode="L").convert(mode)
    image_format = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_image(encode(image, image_format))
    assert decoded.mode == "L"
    # The structure survives conversion: correlation with the original stays high.
    correlation = np.corrcoef(np.asarray(decoded, dtype=float).ravel(), array.astype(float).ravel())[0, 1]
    assert correlation > 0.9


def test_decode_applies_exif_orientation():
    image = Image.fromarray(make_xray_array(4, size=(200, 300)), mode="L")  # 300 wide, 200 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (200, 300)


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", InvalidImageError, "empty"),
        (b"hello, this is text", UnsupportedImageError, "not a PNG, JPEG or DICOM"),
        ("truncated", InvalidImageError, "damaged or truncated"),
        ("gif", UnsupportedImageError, "GIF images are not accepted"),
        ("tiny", InvalidImageError, "at least"),
        ("strip", InvalidImageError, "not the shape"),
        ("bomb", InvalidImageError, "too many pixels"),
        ("large", InvalidImageError, "too many pixels"),
        (b"\0" * 128 + b"DICM" + b"\0" * 64, InvalidImageError, "DICOM"),
    ],
)
def test_decode_rejects_bad_input(data, error, message):
    if data == "truncated":
        data = encode(Image.fromarray(make_xray_array(5), mode="L"), "JPEG")[:2000]
    elif data == "gif":
        data = encode(Image.fromarray(make_xray_array(5), mode="L"), "GIF")
    elif data == "tiny":
        data = encode(Image.new("L", (1, 1)))
    elif data == "strip":
        data = encode(Image.new("L", (4000, 100)))
    elif data == "bomb":
        data = encode(Image.new("L", (10000, 10000)))
    elif data == "large":
        data = encode(Image.new("L", (7100, 7100)))
    with pytest.raises(error, match=message):
        decode_image(data)


@pytest.mark.parametrize("recipe", ["tutorial", "robust"])
def test_transforms_give_normalised_three_channel_tensors(recipe):
    params = eval_transform_params(image_size=64, recipe=recipe)
    image = Image.fromarray(make_xray_array(6, size=(120, 90)), mode="L")
    for transform in (build_eval_transform(params), build_train_transform(params, recipe=recipe)):
        tensor = transform(image)
        assert tensor.shape == (3, 64, 64)
        assert tensor.dtype == torch.float32


def test_eval_transform_is_deterministic():
    params = eval_transform_params(image_size=64, recipe="robust")
    image = Image.fromarray(make_xray_array(7), mode="L")
    assert torch.equal(build_eval_transform(params)(image), build_eval_transform(params)(image))


def _checkpoint(arch="resnet18"):
    network = build_model(arch, num_classes=3)
    return network, make_checkpoint(
        network, arch=arch, class_names=CLASS_NAMES, transform=eval_transform_params(image_size=64)
    )


def test_checkpoint_round_trip_weights_only_and_plain_torchvision(tmp_path):
    network, checkpoint = _checkpoint()
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["class_names"] == CLASS_NAMES and raw["arch"] == "resnet18"
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(raw["state_dict"])
    loaded = build_model_from_checkpoint(load_checkpoint(path))
    batch = torch.randn(2, 3, 64, 64)
    network.eval()
    plain.eval()
    assert torch.allclose(loaded(batch), network(batch), atol=1e-6)
    assert torch.allclose(plain(batch), network(batch), atol=1e-6)


def test_half_export_loads_back_as_float32_and_agrees(tmp_path):
    network, checkpoint = _checkpoint()
    path = save_checkpoint(to_serving(checkpoint, half=True), tmp_path / "half.pt")
    assert torch.load(path, weights_only=True)["state_dict"]["conv1.weight"].dtype == torch.float16
    loaded = load_checkpoint(path)
    assert loaded["state_dict"]["conv1.weight"].dtype == torch.float32
    batch = torch.randn(2, 3, 64, 64)
    network.eval()
    difference = (torch.softmax(build_model_from_checkpoint(loaded)(batch), 1) - torch.softmax(network(batch), 1))
    assert difference.abs().max() < 0.01


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("missing", "not found"),
        ("truncated", "not a readable CovidScan checkpoint"),
        ("foreign", "missing format_version"),
        ("text", "not a readable CovidScan checkpoint"),
        ("wrong_arch", "do not fit"),
        ("version", "format"),
    ],
)
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, corrupt, message):
    _, checkpoint = _checkpoint()
    path = tmp_path / "bad.pt"
    if corrupt == "truncated":
        save_checkpoint(checkpoint, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif corrupt == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif corrupt == "text":
        path.write_text("hello")
    elif corrupt == "wrong_arch":
        checkpoint["arch"] = "resnet34"
        save_checkpoint(checkpoint, path)
    elif corrupt == "version":
        checkpoint["format_version"] = 99
        save_checkpoint(checkpoint, path)
    with pytest.raises(CheckpointError, match=message):
        build_model_from_checkpoint(load_checkpoint(path))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    _, checkpoint = _checkpoint()
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_predictor_probabilities_and_heatmap(tiny_checkpoint_path, xray_png):
    predictor = Predictor.from_path(tiny_checkpoint_path)
    prediction = predictor.predict_bytes(xray_png)
    assert set(prediction.probabilities) == set(CLASS_NAMES)
    assert abs(sum(prediction.probabilities.values()) - 1) < 1e-5
    assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
    assert prediction.heatmap.size == (256, 256) and prediction.heatmap.mode == "RGB"
    assert len(predictor.sha256) == 64


def test_cam_follows_the_evidence():
    """A network whose only evidence is a bright patch puts the heatmap on that patch."""
    from model.cam import ActivationRecorder, class_activation_maps

    network = build_model("resnet18", num_classes=2).eval()
    recorder = ActivationRecorder(network)
    image = torch.zeros(1, 3, 128, 128)
    image[:, :, 80:120, 80:120] = 3.0
    with torch.inference_mode():
        network(image)
        activations = recorder.activations
        # Head weight = mean activation inside the patch minus outside: class 1 "sees" the patch.
        inside = activations[0, :, 2:4, 2:4].mean(dim=(1, 2))
        outside = activations[0, :, :2, :2].mean(dim=(1, 2))
        head = torch.stack([outside - inside, inside - outside])
    cam = class_activation_maps(activations, head, torch.tensor([1]))[0]
    assert cam[2:, 2:].mean() > cam[:2, :2].mean()
    assert cam.max() == pytest.approx(1.0)


def _framed(image, border, fill):
    """``image`` inside a frame of ``fill`` grey, ``border`` = (left, top, right, bottom) pixels."""
    return ImageOps.expand(image, border=border, fill=fill)


def test_foreground_equalisation_ignores_black_borders():
    from model.transforms import IntensityNormalize

    image = Image.fromarray(np.clip(make_xray_array(5, size=(96, 96)), 1, 255))  # no pure black inside
    padded = _framed(image, (12, 12, 12, 12), 0)
    inner = (12, 12, 108, 108)
    foreground = IntensityNormalize("equalize_foreground")
    assert np.array_equal(np.asarray(foreground(padded).crop(inner)), np.asarray(foreground(image)))
    plain = IntensityNormalize("equalize")
    assert not np.array_equal(np.asarray(plain(padded).crop(inner)), np.asarray(plain(image))), \
        "whole-image equalisation is shifted by the border: the reason for the foreground mode"
    black = Image.new("L", (32, 32), 0)
    assert np.array_equal(np.asarray(foreground(black)), np.zeros((32, 32)))


def test_a_checkpoint_naming_the_retired_clahe_mode_gets_a_clear_error():
    params = eval_transform_params(image_size=64, recipe="robust")
    with pytest.raises(ValueError, match="'clahe' is no longer supported"):
        build_eval_transform({**params, "intensity": "clahe"})


def test_old_transform_dicts_build_the_same_eval_transform():
    """Checkpoints written before trim_borders existed (the shipped 2026.11.27-4 among them) still load alike."""
    shipped = {"image_size": 64, "resize_mode": "letterbox", "crop_size": 64, "intensity": "equalize", "channels": 3,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    image = Image.fromarray(make_xray_array(8, size=(80, 64)))
    current = eval_transform_params(image_size=64, recipe="robust", resize_mode="letterbox")
    assert torch.equal(build_eval_transform(shipped)(image), build_eval_transform(current)(image))


def test_intensity_override_is_stored_in_the_eval_params():
    assert eval_transform_params(image_size=64, recipe="robust")["intensity"] == "equalize"
    params = eval_transform_params(image_size=64, recipe="robust", intensity="autocontrast")
    assert params["intensity"] == "autocontrast"
    tensor = build_eval_transform(params)(Image.fromarray(make_xray_array(7)))
    assert tensor.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown intensity mode"):
        eval_transform_params(recipe="robust", intensity="gamma")


def test_resize_override_is_stored_and_squash_leaves_no_black_bars():
    assert eval_transform_params(image_size=32, recipe="robust")["resize_mode"] == "squash"
    letterbox = eval_transform_params(image_size=32, recipe="robust", resize_mode="letterbox")
    assert letterbox["resize_mode"] == "letterbox" and letterbox["intensity"] == "equalize"
    plain = {**letterbox, "intensity": "none"}
    wide = Image.new("L", (96, 48), color=200)  # a bright 2:1 image: letterboxing adds black rows
    squashed = build_eval_transform({**plain, "resize_mode": "squash"})(wide)
    letterboxed = build_eval_transform(plain)(wide)
    assert squashed.shape == letterboxed.shape == (3, 32, 32)
    assert torch.allclose(squashed, squashed[:, :1, :1].expand_as(squashed))  # uniform: no bars
    assert letterboxed[0, 0, 0] < letterboxed[0, 16, 16]  # the top row is a black bar
    with pytest.raises(ValueError, match="unknown resize mode"):
        eval_transform_params(recipe="robust", resize_mode="crop")


def test_batch_mixing_mixes_films_and_labels_with_the_same_weight():
    assert batch_mixing(3) is None  # both off: no random draw, the batch is left alone
    torch.manual_seed(0)
    images = torch.stack([torch.full((1, 4, 4), float(value)) for value in (0.0, 10.0, 20.0, 30.0)])
    labels = torch.tensor([0, 1, 2, 0])
    mixed, targets = batch_mixing(3, mixup_alpha=0.2)(images, labels)
    assert targets.shape == (4, 3) and torch.allclose(targets.sum(dim=1), torch.ones(4))
    weight = targets[1, 1]  # film 1 keeps its own label with the weight it keeps of its own pixels
    assert 0 < weight < 1
    assert torch.allclose(mixed[1], weight * images[1] + (1 - weight) * images[0])
    assert torch.allclose(mixed[0], weight * images[0] + (1 - weight) * images[3])  # its neighbour wraps around
    cut, cut_targets = batch_mixing(3, cutmix_alpha=1.0)(images, labels)
    pasted = (cut[1] == images[0]).float().mean()  # a box of film 0 pasted into film 1, label weighted by area
    assert torch.allclose(cut_targets[1, 0], pasted) and set(cut[1].unique().tolist()) <= {0.0, 10.0}
    with pytest.raises(ValueError, match="mixup alpha must be 0 .off. or positive"):
        batch_mixing(3, mixup_alpha=-0.1)


@pytest.mark.parametrize("alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}])
def test_mix_views_mixes_every_view_of_a_batch_alike(alphas):
    torch.manual_seed(0)
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    mixing = batch_mixing(3, **alphas)
    for _ in range(5):  # several draws, so that both mixes of RandomChoice come up
        (first, second, darker), targets = mix_views(mixing, [images, images.clone(), images / 2], labels)
        assert torch.equal(first, second) and torch.allclose(darker, first / 2)  # same partner, weight and box
        assert targets.shape == (4, 3) and torch.allclose(targets.sum(dim=1), torch.ones(4))


def test_two_views_draws_each_view_through_its_own_transform():
    views = TwoViews(lambda image: ("first", image), lambda image: ("second", image))
    assert views("film") == (("first", "film"), ("second", "film"))


def test_robust_recipe_has_its_augmentations_and_no_flips():
    params = eval_transform_params(image_size=32, recipe="robust")
    steps = repr(build_train_transform(params, recipe="robust"))
    for name in ("RandomAcquisition", "RandomResizedCrop", "RandomAffine", "RandomErasing", "IntensityNormalize"):
        assert name in steps
    assert "Flip" not in steps  # a mirrored film puts the heart on the wrong side
    assert "RandomHorizontalFlip" in repr(build_train_transform(params, recipe="tutorial"))
    with pytest.raises(ValueError, match="unknown recipe"):
        build_train_transform(params, recipe="mixup")


def _noisy(image, sigma, seed=0):
    pixels = np.asarray(image, dtype=np.float32) + np.random.default_rng(seed).normal(0, sigma, image.size[::-1])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def _ribbed(seed, size):
    """A synthetic film with broad ribs: no outer row or column of it is flat."""
    rows = np.arange(size[0])[:, None]
    pixels = make_xray_array(seed=seed, size=size) + 30 * np.sin(2 * np.pi * rows / (size[0] / 4))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def test_trimming_takes_off_a_frame_of_any_grey_level_even_under_noise():
    image = _ribbed(8, (120, 100))
    assert content_box(image) == (0.0, 0.0, 1.0, 1.0)
    for fill in (0, 255, 90):  # black, white, grey
        framed = _framed(image, (7, 11, 5, 9), fill)
        assert np.array_equal(np.asarray(TrimBorders()(framed)), np.asarray(image)), fill
        # the audit's sensor noise (sigma 8) over the whole film moves the box by at most two pixels on any side
        clean, noisy = (np.array(content_box(film)) * np.tile(framed.size, 2)
                        for film in (framed, _noisy(framed, 8)))
        assert np.abs(clean - noisy).max() <= 2.0, (fill, clean, noisy)
    # a large film is judged on a small copy: the box is right to within a pixel of that copy
    large = _framed(_ribbed(8, (600, 500)), (40, 70, 30, 50), 0)
    left, top, right, bottom = content_box(large)
    scale = 256 / large.height
    assert abs(left * large.width - 40) <= 1 / scale and abs(top * large.height - 70) <= 1 / scale
    assert abs(right * large.width - 540) <= 1 / scale and abs(bottom * large.height - 670) <= 1 / scale


def test_trimming_a_film_framed_on_some_sides_matches_trimming_it_bare():
    # make_xray_array's outer columns are flat tissue, trimmed too; a frame on the top and bottom runs through them,
    # so only a second pass inside the first box finds them
    image = Image.fromarray(make_xray_array(seed=8, size=(120, 100)), mode="L")
    bare = np.asarray(TrimBorders()(image))
    assert bare.shape[1] < 100
    assert np.array_equal(np.asarray(TrimBorders()(_framed(image, (0, 11, 0, 9), 0))), bare)


def test_trimming_keeps_textured_and_flat_films_whole_and_takes_at_most_a_third_from_a_side():
    textured = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 80), dtype=np.uint8), mode="L")
    assert content_box(textured) == (0.0, 0.0, 1.0, 1.0)
    assert content_box(Image.new("L", (90, 80), 40)) == (0.0, 0.0, 1.0, 1.0)
    half_black = _framed(textured, (120, 0, 0, 0), 0)  # 60 % of the width is black
    assert content_box(half_black) == pytest.approx((0.35, 0.0, 1.0, 1.0))


def test_trimming_is_stored_with_the_eval_transform_and_applied_in_training_and_serving():
    image = Image.fromarray(make_xray_array(seed=9, size=(72, 64)), mode="L")
    framed = _framed(image, (9, 4, 6, 12), 0)
    params = eval_transform_params(image_size=32, recipe="robust", trim_borders=True)
    assert params["trim_borders"] is True
    assert eval_transform_params(image_size=32)["trim_borders"] is False
    trimming = build_eval_transform(params)
    assert torch.equal(trimming(framed), trimming(image))
    plain = build_eval_transform({**params, "trim_borders": False})
    assert not torch.equal(plain(framed), plain(image))
    legacy = {key: value for key, value in params.items() if key != "trim_borders"}  # checkpoints before the option
    assert torch.equal(build_eval_transform(legacy)(framed), plain(framed))
    robust = build_train_transform(params, recipe="robust")
    assert isinstance(robust.transforms[0], TrimBorders)  # training trims first, exactly as serving does
    tutorial = build_train_transform(eval_transform_params(image_size=32, trim_borders=True), recipe="tutorial")
    assert isinstance(tutorial.transforms[0], TrimBorders)
    assert seen_box(params, framed) == content_box(framed) and seen_box(legacy, framed) is None


def test_heatmap_of_a_trimmed_film_lies_on_what_the_model_saw():
    from model.cam import cam_to_image_space

    params = eval_transform_params(image_size=32, trim_borders=True)
    heat = cam_to_image_space(np.ones((4, 4), dtype=np.float32), params, (100, 50), content_box=(0.1, 0.2, 0.9, 0.6))
    assert heat.shape == (50, 100)
    assert heat[10:30, 10:90].min() > 0.9
    assert heat[:10].max() == 0 and heat[30:].max() == 0 and heat[:, :10].max() == 0 and heat[:, 90:].max() == 0


def test_a_trimming_model_gives_the_same_answer_with_or_without_a_black_frame():
    network = build_model("resnet18", num_classes=3)
    checkpoint = make_checkpoint(network, arch="resnet18", class_names=CLASS_NAMES,
                                 transform=eval_transform_params(image_size=64, trim_borders=True))
    predictor = Predictor(checkpoint)
    image = Image.fromarray(make_xray_array(seed=10, size=(160, 140)), mode="L")
    bare, framed = (predictor.predict_image(film) for film in (image, _framed(image, (20, 10, 15, 25), 0)))
    assert bare.probabilities == pytest.approx(framed.probabilities, abs=1e-5)
    assert framed.heatmap.size == (175, 195)


def test_a_trimming_model_finds_the_box_once_per_film_for_input_and_heatmap(monkeypatch):
    import model.transforms

    network = build_model("resnet18", num_classes=3)
    checkpoint = make_checkpoint(network, arch="resnet18", class_names=CLASS_NAMES,
                                 transform=eval_transform_params(image_size=64, trim_borders=True))
    predictor = Predictor(checkpoint)
    framed = _framed(Image.fromarray(make_xray_array(seed=11, size=(160, 140)), mode="L"), (20, 10, 15, 25), 0)
    expected = torch.softmax(predictor.forward(predictor.preprocess(framed))[0], dim=1)[0].tolist()
    calls = []
    monkeypatch.setattr(model.transforms, "content_box", lambda image: calls.append(1) or content_box(image))
    prediction = predictor.predict_image(framed)
    assert len(calls) == 1
    assert list(prediction.probabilities.values()) == pytest.approx(expected, abs=1e-6)
