"""The tiered prefix cache of KV states: hot in RAM, cold and compressed on disk."""
