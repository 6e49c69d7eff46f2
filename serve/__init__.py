"""Data plane: ONNX Runtime replicas behind an OpenAI/NIM embeddings gateway on Ray Serve (no torch import)."""
