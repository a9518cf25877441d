"""Text that is not valid Unicode (a lone UTF-16 surrogate), at every entrance but the
service (tests/test_serve.py): the API, the magics, fine-tuning data, KV session names.
Each is refused with a BadText naming the field and the character; the worker that
serves the model is the same one afterwards."""

from __future__ import annotations

import json

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench.errors import BadText, EngineFault, WorkbenchError

BAD = "a\ud800b"


def _same_worker(loaded, pid: int) -> None:
    assert loaded.alive and loaded.pid == pid and loaded.model is not None


@pytest.mark.parametrize("call, where", [
    (lambda: workbench.chat(BAD, max_tokens=4), "messages[0].content"),
    (lambda: workbench.chat("hi", system=BAD, max_tokens=4), "messages[0].content"),
    (lambda: workbench.chat([{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "yo"},
                             {"role": "user", "content": BAD}], max_tokens=4),
     "messages[2].content"),
    (lambda: workbench.generate(BAD, max_tokens=4), "the prompt"),
    (lambda: workbench.generate("hi", stop=["x", BAD], max_tokens=4), "stop[1]"),
    (lambda: workbench.generate_many(["fine", BAD], max_tokens=4), "the prompt"),
    (lambda: workbench.kv_save(BAD), "the KV session name"),
])
def test_api_refuses_lone_surrogates(loaded, call, where):
    pid = loaded.pid
    with pytest.raises(BadText) as e:
        call()
    assert e.value.where == where and e.value.position == 1
    assert "lone surrogate (\\ud800) at character 1" in e.value.message and e.value.hint
    _same_worker(loaded, pid)
    assert workbench.generate("Hello", max_tokens=2, temperature=0).text is not None


def test_magics_show_one_line_for_lone_surrogates(loaded, capsys):
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    pid = loaded.pid
    for cell in (f"%%chat --max-tokens 4\n{BAD}", f"%%generate --max-tokens 4\n{BAD}",
                 f"%%chat --max-tokens 4 --system {BAD}\nhi", f"%kv save {BAD}"):
        capsys.readouterr()
        r = sh.run_cell(cell, store_history=False)
        assert isinstance(r.error_in_exec, BadText), (cell, r.error_in_exec)
        out = capsys.readouterr()
        text = out.out + out.err
        assert "lone surrogate" in text and "Traceback" not in text, text
    _same_worker(loaded, pid)


def test_finetune_data_names_the_line(tmp_path):
    from workbench.finetune.data import read_data

    data = tmp_path / "data.jsonl"
    good = {"prompt": "q", "completion": "a"}
    data.write_text("\n".join([json.dumps(good),  # \ud800 below: JSON's escape, valid JSON
                               '{"messages": [{"role": "user", "content": "hi"}, '
                               '{"role": "assistant", "content": "x\\ud800"}]}']))
    with pytest.raises(BadText) as e:
        read_data(data)
    assert e.value.where == "line 2 of data.jsonl, message 2" and e.value.position == 1
    with pytest.raises(BadText, match="example 1"):
        read_data([{"text": BAD}])
    with pytest.raises(WorkbenchError, match="not UTF-8"):  # bytes, not a JSON escape
        (tmp_path / "raw.txt").write_bytes(b"caf\xe9 au lait\n\nmore")
        read_data(tmp_path / "raw.txt")


def test_an_injected_worker_failure_is_an_error_with_a_hint(default_model, monkeypatch):
    """A bug inside the worker fails that request with an EngineFault, not a traceback;
    the worker goes on."""
    monkeypatch.setenv("WORKBENCH_FAULT", "decode:POISON")
    e = workbench.engine()
    e.close()  # the next worker starts with the hook set
    workbench.load_model(default_model, progress=False, n_ctx=2048)
    try:
        pid = e.pid
        with pytest.raises(EngineFault) as info:
            workbench.generate("POISON", max_tokens=8, temperature=0)
        assert "the engine failed on this request" in info.value.message
        assert info.value.hint and "Traceback" in info.value.details
        assert "Traceback" not in str(info.value)
        assert e.pid == pid and workbench.generate("Hi", max_tokens=2).text is not None
    finally:
        monkeypatch.delenv("WORKBENCH_FAULT")
        e.close()
