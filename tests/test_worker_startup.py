"""The PACS worker checks its model as the app does before it claims or writes anything (no PACS needed)."""

import logging

import pytest


def run_worker(model, tmp_path):
    import pacs_worker

    args = pacs_worker.get_args_parser().parse_args([
        "--pacs-url", "http://127.0.0.1:9/dicom-web", "--once", "--model", str(model),
        "--database-url", f"sqlite:///{tmp_path / 'worklist.sqlite3'}"])
    pacs_worker.main(args)


@pytest.fixture(autouse=True)
def scripts_on_path(monkeypatch):
    from conftest import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    for name in ("COVIDSCAN_MODEL_SHA256", "COVIDSCAN_ALLOWED_CLASS_NAMES", "COVIDSCAN_INFERENCE_BACKEND"):
        monkeypatch.delenv(name, raising=False)


def test_a_pinned_digest_that_does_not_match_stops_the_worker(tiny_checkpoint_path, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_MODEL_SHA256", "0" * 64)
    with pytest.raises(SystemExit, match="COVIDSCAN_MODEL_SHA256 pins 0000"):
        run_worker(tiny_checkpoint_path, tmp_path)


def test_a_malformed_digest_stops_the_worker(tiny_checkpoint_path, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_MODEL_SHA256", "abc")
    with pytest.raises(SystemExit, match="must be the checkpoint's SHA-256 hex digest"):
        run_worker(tiny_checkpoint_path, tmp_path)


def test_other_class_names_stop_the_worker(tiny_checkpoint_path, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_ALLOWED_CLASS_NAMES", "NORMAL,COVID,PNEUMONIA")
    with pytest.raises(SystemExit, match="class names are \\[COVID, NORMAL, PNEUMONIA\\], but this server serves"):
        run_worker(tiny_checkpoint_path, tmp_path)


def test_failed_reference_films_stop_the_worker(tiny_checkpoint_path, tmp_path):
    """Swapped labels: the stored reference films now come out as another class."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.references import REFERENCES_KEY, store_input

    checkpoint = load_checkpoint(tiny_checkpoint_path)
    stored = store_input(__import__("torch").zeros(3, 64, 64), checkpoint["transform"])
    checkpoint[REFERENCES_KEY] = {"COVID": {"input": stored,
                                            "probabilities": {"COVID": 0.98, "NORMAL": 0.01, "PNEUMONIA": 0.01}}}
    path = save_checkpoint(checkpoint, tmp_path / "swapped.pt")
    with pytest.raises(SystemExit, match="fails its reference check"):
        run_worker(path, tmp_path)


def test_a_checked_model_gets_as_far_as_the_pacs(tiny_checkpoint_path, tmp_path, caplog, monkeypatch):
    """The same checkpoint without a bad setting passes every check and the worker starts its run."""
    import pacs.worker

    monkeypatch.setattr(pacs.worker.Worker, "run_once", lambda self: 0)
    with caplog.at_level(logging.INFO):
        run_worker(tiny_checkpoint_path, tmp_path)
    assert "inference backend" in caplog.text and "done: 0 image(s) processed" in caplog.text
