"""The inference engine: a worker process that owns llama.cpp, and its kernel-side client."""
