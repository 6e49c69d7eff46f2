"""Data plane: ONNX Runtime replicas behind an OpenAI/NIM embeddings gateway on Ray Serve (planned: issue 3)."""
