"""Shared, torch-free foundations of cluster/, train/, tune/ and serve/: the ONNX artifact contract
(`rayembed.artifact`), the config layer (`rayembed.config`) and the CLI runner (`rayembed.cli`)."""
