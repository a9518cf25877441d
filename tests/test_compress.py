"""Quantization, quality evaluation and layer pruning on the real default model, through
llama.cpp in child processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench.errors import WorkbenchError
from workbench.models.gguf_file import read_header
from workbench.models.inspect import inspect_model


@pytest.fixture(scope="module")
def variants(tmp_path_factory, default_model):
    d = tmp_path_factory.mktemp("q")
    f16 = workbench.quantize(default_model, "f16", d / "ref.F16.gguf", progress=False)
    q8 = workbench.quantize(default_model, "int8", d / "m.Q8_0.gguf", progress=False)
    q4 = workbench.quantize(default_model, "int4", d / "m.Q4_K_M.gguf", progress=False)
    return {"f16": f16, "q8": q8, "q4": q4, "dir": d}


def test_quantize_writes_valid_files_of_the_asked_type(variants, default_model):
    for key, quant in (("f16", "F16"), ("q8", "Q8_0"), ("q4", "Q4_K_M")):
        q = variants[key]
        assert q.quant == quant and q.path.is_file() and q.source == default_model
        assert read_header(q.path).quantization == quant
        assert q.bytes == q.path.stat().st_size
    assert variants["f16"].bytes > variants["q8"].bytes > variants["q4"].bytes
    assert not list(variants["dir"].glob(".*.partial"))


def test_quantize_through_the_magic_with_a_default_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell("%quantize --to q4_0")
    assert r.success, r.error_in_exec
    # the bundled model lives in a package: the output goes to ~/.workbench/models
    assert r.result.path == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_0.gguf"
    assert "Q4_0" in repr(r.result)


def test_quantize_bad_inputs(variants, default_model, tmp_path):
    with pytest.raises(WorkbenchError, match="unknown quantization 'q3_x'") as e:
        workbench.quantize(default_model, "q3_x", progress=False)
    assert "int8" in e.value.hint and "Q4_K_M" in e.value.hint
    with pytest.raises(WorkbenchError, match="already Q8_0"):
        workbench.quantize(variants["q8"].path, "int8", tmp_path / "x.gguf", progress=False)
    with pytest.raises(WorkbenchError, match="exists") as e:
        workbench.quantize(default_model, "int8", variants["q8"].path, progress=False)
    assert "overwrite=True" in e.value.hint
    again = workbench.quantize(default_model, "int8", variants["q8"].path, overwrite=True,
                               progress=False)
    assert again.path == variants["q8"].path
    with pytest.raises(WorkbenchError, match="does not exist"):
        workbench.quantize(default_model, "int8", tmp_path / "no" / "x.gguf", progress=False)
    # a folder nobody may write to, even root: /proc
    with pytest.raises(WorkbenchError, match="cannot write to /proc"):
        workbench.quantize(default_model, "int8", "/proc/x.Q8_0.gguf", progress=False)
    for layers, match in (([40], "out of range"), (list(range(30)), "every layer")):
        with pytest.raises(WorkbenchError, match=match):
            workbench.prune(default_model, layers=layers, out=tmp_path / "p.gguf",
                            progress=False)
    with pytest.raises(WorkbenchError, match="cannot prune 30"):
        workbench.prune(default_model, layers=30, progress=False)


def test_a_disk_that_fills_leaves_no_partial_file(tmp_path, default_model):
    # The child may write 20 MiB at most; Q8_0 is 145 MB: the write fails as on a full disk.
    code = ("import resource, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))\n"
            "import workbench\n"
            "if __name__ == '__main__':\n"
            "    try:\n"
            f"        workbench.quantize(None, 'int8', {str(tmp_path / 'q8.gguf')!r}, "
            "progress=False)\n"
            "    except workbench.WorkbenchError as e:\n"
            "        print('ERROR', e.message, '|', e.hint)\n")
    script = tmp_path / "fill.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "WORKBENCH_HOME": str(tmp_path)})
    assert "ERROR" in out.stdout, out.stdout + out.stderr
    assert "could not quantize" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf"
                  or p.name.endswith(".partial")) == []


def test_evaluate_against_the_f16_reference(variants, default_model):
    ev = workbench.evaluate([default_model, variants["q8"], variants["q4"]],
                            reference=variants["f16"], max_chunks=2, progress=False)
    ref, q41, q8, q4 = (ev.row(p) for p in (variants["f16"].path, default_model,
                                            variants["q8"].path, variants["q4"].path))
    assert ref.kl_mean is None and ref.perplexity > 1
    assert "requantization loss" in ev.note  # the reference is an F16 copy of a Q4_1 model
    for r in (q41, q8, q4):
        assert r.kl_mean is not None and 0 <= r.kl_mean and 0 < r.top1 <= 1
        assert r.pp_tps > 0 and r.tg_tps > 0 and r.load_s > 0
    assert q8.kl_mean < q4.kl_mean and q8.top1 > q4.top1  # more bits, closer to the reference
    assert q8.kl_mean < 0.02
    assert ev.tokens_scored == 2 * 255
    # the original Q4_1 is both the smallest and the closest: nothing else is on the front
    assert ev.pareto() == [q41]
    fig = ev.figure("kl_mean")
    marker = fig.data[0]
    assert list(marker.x) == [r.bytes / 2**20 for r in (q41, q8, q4)]
    assert [c == "#d62728" for c in marker.marker.color] == [True, False, False]
    assert "KL (mean)" in repr(ev) and "<table>" in ev._repr_html_()


def test_evaluate_bad_inputs(default_model, tmp_path):
    from workbench.models import synthetic

    import gguf

    vocab = tmp_path / "vocab.gguf"  # a vocabulary-only file of 300 tokens
    w = gguf.GGUFWriter(str(vocab), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(300)])
    w.add_token_types([1] * 300)
    w.add_token_merges([])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    other = synthetic("tiny", "q4_0", tmp_path / "tiny.gguf", tokenizer_from=vocab)
    with pytest.raises(WorkbenchError, match="vocabulary"):
        workbench.evaluate([other], reference=default_model, progress=False)
    with pytest.raises(WorkbenchError, match="fewer than one chunk"):
        workbench.evaluate([default_model], text="too short", progress=False)


def test_prune_ranks_layers_and_writes_a_loadable_model(default_model, tmp_path):
    from workbench.compress.prune import rank_layers

    ranking = rank_layers(default_model)
    assert len(ranking.distances) == 30 and ranking.tokens == 512
    assert all(0 <= d <= 1 for d in ranking.distances)
    # the first and last layers change their input most
    two = ranking.least_important(2)
    assert 0 not in two and 29 not in two
    p = workbench.prune(default_model, layers=2, out=tmp_path / "p.gguf", progress=False)
    assert p.pruned_layers == two and p.ranking.distances == ranking.distances
    assert inspect_model(p.path).n_layers == 28
    assert read_header(p.path).quantization == "Q4_1"  # tensors copied as they were
    ev = workbench.evaluate([p], reference=default_model, max_chunks=1, progress=False)
    assert ev.row(p.path).kl_mean > 0.01  # two layers fewer: measurably different
    workbench.load_model(p.path, progress=False, n_ctx=256)
    assert workbench.generate("The", max_tokens=3, temperature=0,
                              ignore_eos=True).metrics.generated_tokens == 3


def test_ffn_channels_pruned_by_activation(default_model, tmp_path):
    p = workbench.prune(default_model, ffn_keep=0.75, out=tmp_path / "f.gguf", progress=False)
    m = inspect_model(p.path)
    assert m.n_ff == 1152 and m.n_layers == 30  # 3/4 of 1,536, in whole 32-wide blocks
    assert p.bytes < p.source_bytes
    ev = workbench.evaluate([p], reference=default_model, max_chunks=1, progress=False)
    assert 0.01 < ev.row(p.path).kl_mean and ev.row(p.path).perplexity < 100
    for bad, match in (({"ffn_keep": 1.5}, "between 0 and 1"),
                       ({"ffn_keep": 0.75, "layers": 2}, "either layers"),
                       ({}, "either layers")):
        with pytest.raises(WorkbenchError, match=match):
            workbench.prune(default_model, out=tmp_path / "g.gguf", progress=False, **bad)
    with pytest.raises(WorkbenchError, match="exists"):
        workbench.prune(default_model, ffn_keep=0.5, out=p.path, progress=False)


def test_distill_trains_toward_the_teacher_and_writes_a_loadable_model(default_model, tmp_path):
    pruned = workbench.prune(default_model, layers=[14, 25], out=tmp_path / "p.gguf",
                             progress=False)
    d = workbench.distill(pruned, steps=4, seq_len=64, out=tmp_path / "d.gguf", progress=False)
    assert d.path.is_file() and len(d.losses) == 4 and all(x > 0 for x in d.losses)
    assert read_header(d.path).quantization == "Q4_1"  # quantized back to the student's type
    assert inspect_model(d.path).n_layers == 28
    assert workbench.inspect_model(pruned).n_layers == 28  # a result stands for its file
    assert not list(tmp_path.glob(".*partial"))
    # the weights changed, and llama.cpp loads and runs the result
    ev = workbench.evaluate([pruned, d], reference=default_model, max_chunks=1, progress=False)
    assert ev.row(d.path).kl_mean != ev.row(pruned.path).kl_mean
    workbench.load_model(d.path, progress=False, n_ctx=256)
    assert workbench.generate("The", max_tokens=3, temperature=0,
                              ignore_eos=True).metrics.generated_tokens == 3
    assert "steps" in repr(d) and len(d.figure().data) == 1
    with pytest.raises(WorkbenchError, match="steps must be"):
        workbench.distill(pruned, steps=0, progress=False)
    with pytest.raises(WorkbenchError, match="train_from=99 is not a layer"):
        workbench.distill(pruned, steps=1, train_from=99, progress=False)
    with pytest.raises(WorkbenchError, match="unknown quantization"):
        workbench.distill(pruned, steps=1, to="Q3_X", progress=False)
    with pytest.raises(WorkbenchError, match="exists"):
        workbench.distill(pruned, steps=1, out=d.path, progress=False)


def test_more_bad_inputs_of_evaluation_and_pruning(default_model, tmp_path):
    from gguf_edit import with_strings

    with pytest.raises(WorkbenchError, match="too small or odd") as e:
        workbench.evaluate([default_model], n_ctx=511, progress=False)
    assert e.value.hint
    other = with_strings(default_model, tmp_path / "other-arch.gguf",
                         {"general.architecture": "gemma3"})
    with pytest.raises(WorkbenchError, match="llama-architecture") as e:
        workbench.prune(other, ffn_keep=0.5, progress=False)
    assert "workbench.prune" in e.value.hint
    with pytest.raises(WorkbenchError, match="llama-architecture"):
        workbench.distill(other, steps=1, progress=False)
    # a student must share the teacher's vocabulary, token by token
    retokenized = with_strings(default_model, tmp_path / "other-vocab.gguf",
                               {"tokenizer.ggml.pre": "gpt2"})
    with pytest.raises(WorkbenchError, match="different vocabularies") as e:
        workbench.distill(retokenized, steps=1, progress=False)
    assert "workbench.prune" in e.value.hint


def test_importance_matrix_quantization(variants, tmp_path):
    from workbench import _child
    from workbench.compress.imatrix import importance_child
    from workbench.compress.text import calibration_text

    imp = _child.run(importance_child, (str(variants["f16"].path), calibration_text(4000), 128,
                                        2), "measuring")
    assert len(imp) == 30 * 7 + 1 and imp["output.weight"].shape == (576,)
    assert imp["blk.3.ffn_down.weight"].shape == (1536,) and (imp["blk.3.attn_q.weight"] > 0).all()
    plain = workbench.quantize(variants["f16"], "Q4_0", tmp_path / "plain.gguf", progress=False)
    weighed = workbench.quantize(variants["f16"], "Q4_0", imatrix=True, progress=False,
                                 out=tmp_path / "weighed.gguf")
    # with an importance matrix llama.cpp keeps a few early ffn_down tensors finer
    assert weighed.quant == "Q4_0" and abs(weighed.bytes / plain.bytes - 1) < 0.01
    assert weighed.path.read_bytes() != plain.path.read_bytes()  # the rounding moved
    ev = workbench.evaluate([weighed], reference=variants["f16"], max_chunks=1, progress=False)
    assert ev.row(weighed.path).kl_mean < 1.0  # llama.cpp loads and runs it
