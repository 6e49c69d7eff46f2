"""Customization jobs: JSONL -> Ray Train fine-tuning -> evaluation vs base -> merged, verified ONNX."""
