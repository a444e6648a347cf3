"""The product tests' fixtures (tests/conftest.py), shared with the research tests under another module name."""

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("covidscan_product_fixtures",
                                               Path(__file__).resolve().parents[2] / "tests" / "conftest.py")
fixtures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixtures)

image_folder = fixtures.image_folder
tiny_checkpoint_path = fixtures.tiny_checkpoint_path
