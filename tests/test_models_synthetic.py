"""A synthetic model of a real shape loads and runs in the engine like a real one."""

from __future__ import annotations

import workbench
from workbench.models.gguf_file import read_header
from workbench.models.synthetic import make_synthetic


def test_tiny_synthetic_model_runs(tmp_path, default_model):
    p = make_synthetic(tmp_path / "tiny.gguf", "tiny", tokenizer_from=default_model)
    h = read_header(p)
    assert h.architecture == "llama" and h.arch_value("block_count") == 2
    assert h.metadata["tokenizer.ggml.model"] == read_header(default_model).metadata[
        "tokenizer.ggml.model"]
    info = workbench.load_model(p, progress=False, n_ctx=256)
    assert info.n_layers == 2
    c = workbench.generate("Hello there", max_tokens=5, temperature=0, ignore_eos=True)
    assert c.metrics.generated_tokens == 5
    workbench.load_model(progress=False, n_ctx=2048)
