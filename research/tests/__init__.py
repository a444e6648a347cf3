"""Tests of the research code (run by ``make test`` and ``make test-fast`` like the product's)."""
