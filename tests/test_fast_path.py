"""The int8 fast path: written at export beside the checkpoint, chosen at start-up only when it is safe to run."""

import logging
import shutil

import onnx
import pytest
import torch

from model import runtime
from model.inference import Predictor, file_sha256
from model.quantize import fast_path_path, read_fast_path_metadata


@pytest.fixture
def with_int8_cpu(monkeypatch):
    """Pretend this CPU has int8 dot products (CI machines may not), and name no backend."""
    monkeypatch.setattr(runtime, "cpu_int8_support", lambda: (True, "avx512_vnni"))
    monkeypatch.delenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, raising=False)


def test_export_writes_a_quantized_file_beside_the_checkpoint_that_names_it(tiny_int8_checkpoint_path):
    path = fast_path_path(tiny_int8_checkpoint_path)
    assert path.name == "tiny.int8.onnx" and path.parent == tiny_int8_checkpoint_path.parent
    metadata = read_fast_path_metadata(path)
    assert metadata["checkpoint_sha256"] == file_sha256(tiny_int8_checkpoint_path)
    assert metadata["model_version"] == "test-1"
    assert int(metadata["calibration_films"]) == 12
    graph = onnx.load(str(path)).graph
    operators = [node.op_type for node in graph.node]
    assert operators.count("QuantizeLinear") > 10 and operators.count("DequantizeLinear") > 10
    int8_weights = [each for each in graph.initializer if each.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # resnet18's 20 convolutions
    assert all(not each.name.startswith("network.conv1.weight") for each in int8_weights)  # the stem stays float
    assert all(not each.name.startswith("network.fc.") for each in int8_weights)  # and so does the classifier


def test_export_with_int8_alone_leaves_the_checkpoint_as_it_was(tiny_checkpoint_path, image_folder, tmp_path):
    from scripts.export import get_args_parser, main

    path = tmp_path / "model.pt"
    shutil.copyfile(tiny_checkpoint_path, path)
    before = file_sha256(path)
    main(get_args_parser().parse_args(["--checkpoint", str(path), "--int8", str(image_folder), "--int8-films", "6"]))
    assert file_sha256(path) == before
    assert fast_path_path(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.pt"]  # no temporary files left


def test_export_refuses_a_file_whose_answers_drift(tiny_checkpoint_path, image_folder, tmp_path, monkeypatch):
    import model.quantize
    from scripts.export import get_args_parser, main

    monkeypatch.setattr(model.quantize, "MAX_PROBABILITY_DIFFERENCE", -1.0)
    path = tmp_path / "model.pt"
    shutil.copyfile(tiny_checkpoint_path, path)
    with pytest.raises(SystemExit, match="drift from float32"):
        main(get_args_parser().parse_args(["--checkpoint", str(path), "--int8", str(image_folder),
                                           "--int8-films", "6"]))
    assert not fast_path_path(path).exists()


def test_export_needs_an_output_or_int8(tiny_checkpoint_path):
    from scripts.export import get_args_parser, main

    with pytest.raises(SystemExit, match="give --output"):
        main(get_args_parser().parse_args(["--checkpoint", str(tiny_checkpoint_path)]))


def test_default_is_the_fast_path_when_the_cpu_has_int8_dot_products(tiny_int8_checkpoint_path, with_int8_cpu,
                                                                     caplog):
    with caplog.at_level(logging.INFO, logger="model.runtime"):
        predictor = Predictor.from_path(tiny_int8_checkpoint_path)
    assert predictor.backend == "int8"
    assert "inference backend int8, the fast path" in caplog.text and "avx512_vnni" in caplog.text


def test_without_int8_instructions_the_default_is_float32_onnx_and_says_why(tiny_int8_checkpoint_path, monkeypatch,
                                                                           caplog):
    monkeypatch.setattr(runtime, "cpu_int8_support", lambda: (False, "this CPU has no int8 dot-product instructions"))
    monkeypatch.delenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, raising=False)
    with caplog.at_level(logging.INFO, logger="model.runtime"):
        predictor = Predictor.from_path(tiny_int8_checkpoint_path)
    assert predictor.backend == "onnx"
    assert "not the int8 fast path: this CPU has no int8 dot-product instructions" in caplog.text


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_onnx_by_name_stays_float32_for_comparison(tiny_int8_checkpoint_path, with_int8_cpu, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, "onnx")
    predictor = Predictor.from_path(tiny_int8_checkpoint_path, backend="onnx" if how == "argument" else None)
    assert predictor.backend == "onnx"


def _no_file(source, folder):
    shutil.copyfile(source, folder / "tiny.pt")


def _file_of_another_checkpoint(source, folder):
    """A retrained checkpoint copied over the old one, beside the old int8 file."""
    from model.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(source)
    checkpoint["model_version"] = "test-2"
    save_checkpoint(checkpoint, folder / "tiny.pt")
    shutil.copyfile(fast_path_path(source), fast_path_path(folder / "tiny.pt"))


def _damaged_file(source, folder):
    shutil.copyfile(source, folder / "tiny.pt")
    fast_path_path(folder / "tiny.pt").write_bytes(b"\x00not an onnx model" * 10)


@pytest.mark.parametrize(("make", "reason"), [
    (_no_file, "there is no int8 file at"),
    (_file_of_another_checkpoint, "was made from another checkpoint"),
    (_damaged_file, "cannot be read"),
])
def test_without_a_file_made_from_this_checkpoint_float32_runs_and_says_why(
        tiny_int8_checkpoint_path, tmp_path, with_int8_cpu, caplog, make, reason):
    make(tiny_int8_checkpoint_path, tmp_path)
    with caplog.at_level(logging.INFO, logger="model.runtime"):
        assert Predictor.from_path(tmp_path / "tiny.pt").backend == "onnx"
    assert reason in caplog.text
    with pytest.raises(runtime.BackendError, match=f"'int8' was asked for, but .*{reason}"):
        Predictor.from_path(tmp_path / "tiny.pt", backend="int8")


def test_a_fast_path_that_fails_to_build_falls_back_with_a_warning(tiny_int8_checkpoint_path, with_int8_cpu,
                                                                   monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("QLinearConv: no kernel")

    monkeypatch.setattr(runtime.Int8OnnxRuntime, "__init__", broken)
    assert Predictor.from_path(tiny_int8_checkpoint_path).backend == "onnx"
    assert "'int8' could not be built: RuntimeError: QLinearConv: no kernel" in caplog.text


def test_fast_path_answers_stay_close_to_float32(tiny_int8_checkpoint_path, xray_png, with_int8_cpu):
    fast = Predictor.from_path(tiny_int8_checkpoint_path)
    reference = Predictor.from_path(tiny_int8_checkpoint_path, backend="onnx")
    assert fast.backend == "int8"
    prediction, expected = fast.predict_bytes(xray_png), reference.predict_bytes(xray_png)
    assert max(abs(prediction.probabilities[name] - expected.probabilities[name]) for name in fast.class_names) < 0.1
    assert prediction.heatmap is not None and prediction.film.size == expected.film.size
    logits, features = fast.forward(fast.preprocess(prediction.film.convert("L")))
    assert logits.dtype == features.dtype == torch.float32 and features.shape[1] == 512


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", (True, "avx512_vnni")),
        ("flags : fpu avx2 avx_vnni\n", (True, "avx_vnni")),
        ("flags : fpu avx2 avx512f amx_int8 amx_tile\n", (True, "amx_int8")),
        ("Features\t: fp asimd asimddp\n", (True, "asimddp")),
        ("flags : fpu sse4_2 avx2 fma\n", (False, None)),
    ],
)
def test_cpu_int8_support_reads_the_cpu_flags(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    supported, detail = runtime.cpu_int8_support(str(path))
    assert supported is expected[0]
    assert detail == expected[1] if supported else "no int8 dot-product instructions" in detail


def test_cpu_int8_support_without_cpuinfo_says_so(tmp_path):
    supported, reason = runtime.cpu_int8_support(str(tmp_path / "missing"))
    assert supported is False and "cannot read" in reason


def test_the_benchmark_counts_resnet_multiply_accumulates_as_published():
    """torchvision's model cards give 1.81 GFLOPS (multiply-accumulates) for resnet18 and 11.51 for resnet152."""
    import sys

    from conftest import REPO_ROOT
    from model.network import build_model

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import bench_fast_path

    assert bench_fast_path.multiply_accumulates(build_model("resnet18", num_classes=1000), 224) / 1e9 == \
        pytest.approx(1.81, abs=0.01)
    peaks = bench_fast_path.nominal_peaks({"cores": 2, "mhz": 2500.0, "avx512f": True, "vendor": "AuthenticAMD"})
    assert peaks["fp32"] == pytest.approx(80.0) and peaks["int8"] == pytest.approx(320.0)
    assert bench_fast_path.nominal_peaks({"cores": 2, "mhz": 2500.0, "avx512f": True,
                                          "vendor": "GenuineIntel"})["fp32"] == pytest.approx(160.0)


def test_the_app_logs_which_path_serves_and_why(tiny_int8_checkpoint_path, with_int8_cpu, caplog):
    from app import create_app

    with caplog.at_level(logging.INFO):
        app = create_app({"TESTING": True, "SECRET_KEY": "test", "MODEL_PATH": str(tiny_int8_checkpoint_path)})
    assert app.extensions["predictor"].backend == "int8"
    lines = [record.getMessage() for record in caplog.records if record.name == app.logger.name]
    backend = [line for line in lines if line.startswith("Inference backend")]
    assert len(backend) == 1 and backend[0].startswith("Inference backend int8, the fast path (")
    assert "this CPU has avx512_vnni" in backend[0]


def test_the_app_refuses_to_start_on_a_fast_path_it_cannot_run(tiny_checkpoint_path, monkeypatch):
    from app import create_app

    monkeypatch.setenv(runtime.BACKEND_ENVIRONMENT_VARIABLE, "int8")
    with pytest.raises(RuntimeError, match="CovidScan cannot start: inference backend 'int8' was asked for, but there "
                                           "is no int8 file at .*Unset COVIDSCAN_INFERENCE_BACKEND"):
        create_app({"TESTING": True, "SECRET_KEY": "test", "MODEL_PATH": str(tiny_checkpoint_path)})
