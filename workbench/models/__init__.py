"""Model files: GGUF headers, the default model."""
