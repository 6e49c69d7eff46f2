"""Batch work on Ray Data: corpus embedding with an ONNX artifact, and hard-negative mining."""
