"""CovidScan model package: network, transforms, checkpoints, training engine and inference (no Flask)."""
