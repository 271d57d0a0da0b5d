"""Architectures served by this package itself; each file is named after its `model_type`."""
