"""Data plane: ONNX Runtime replicas behind an OpenAI/NIM embeddings gateway on Ray Serve (not built yet: issue 3)."""
