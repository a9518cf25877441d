"""The magics through a real IPython InteractiveShell."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench.errors import WorkbenchError
from workbench.results import Completion, EngineStatus, LoadedModel


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    yield sh


def run(shell, cell: str):
    result = shell.run_cell(cell, store_history=True)
    return result


def test_load_model_default(shell, capsys):
    r = run(shell, "%load_model --n-ctx 2048 --threads 2")
    assert r.success, r.error_in_exec
    assert isinstance(r.result, LoadedModel)
    assert r.result.n_ctx == 2048 and r.result.threads == 2
    assert "SmolLM2-135M-Instruct" in repr(r.result)


def test_chat_streams_into_the_output(shell, capsys):
    run(shell, "%load_model default --n-ctx 2048")
    capsys.readouterr()
    r = run(shell, "%%chat --temperature 0 --max-tokens 24\nWhat is the capital of France?")
    assert r.success, r.error_in_exec
    out = capsys.readouterr().out
    assert isinstance(r.result, Completion)
    assert r.result.text.strip() and r.result.text.strip()[:20] in out
    # the displayed result is the metrics line, not the text a second time
    assert "tok/s" in repr(r.result) and r.result.text not in repr(r.result)


def test_generate_with_stop_string(shell, capsys):
    r = run(shell, '%%generate --temperature 0 --max-tokens 60 --stop "3"\n1, 2,')
    assert r.success, r.error_in_exec
    assert "3" not in r.result.text
    assert r.result.finish_reason in ("stop_string", "stop", "length")


def test_help_prints_usage(shell, capsys):
    r = run(shell, "%load_model --help")
    assert r.success and r.result is None
    out = capsys.readouterr().out
    assert "--n-ctx" in out and "--n-gpu-layers" in out and "--threads" in out
    assert "--lora " in out and "%finetune" in out  # a % in a help text is escaped
    r = run(shell, "%%chat --help\nignored")
    assert "--temperature" in capsys.readouterr().out


def _shows_without_traceback(shell, cell, capsys, *needles):
    r = run(shell, cell)
    assert isinstance(r.error_in_exec, WorkbenchError), r.error_in_exec
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    for n in needles:
        assert n in text, text
    return r


def test_errors_show_message_and_hint_without_traceback(shell, capsys, tmp_path):
    _shows_without_traceback(shell, f"%load_model {tmp_path}/missing.gguf", capsys,
                             "model file not found", "Hint:")
    _shows_without_traceback(shell, "%load_model --n-ctx lots", capsys, "invalid int value")
    _shows_without_traceback(shell, "%%chat --temperature -1\nHi", capsys,
                             "temperature must be", "Hint:")
    _shows_without_traceback(shell, "%%generate --top-p 2\nHi", capsys, "top_p")
    _shows_without_traceback(shell, "%%generate --max-tokens -4\nHi", capsys, "max_tokens")
    # the kernel goes on
    assert run(shell, "1 + 1").result == 2


def test_unload_then_chat_says_load_model(shell, capsys):
    run(shell, "%unload_model")
    assert "unloaded" in capsys.readouterr().out
    _shows_without_traceback(shell, "%%chat\nHi", capsys, "no model is loaded", "%load_model")
    assert run(shell, "%load_model --n-ctx 2048").success


def test_workbench_status(shell):
    r = run(shell, "%workbench")
    assert isinstance(r.result, EngineStatus)
    assert r.result.state == "ready" and r.result.worker_pid == workbench.engine().pid
    assert "worker pid" in repr(r.result)


def test_interrupting_a_chat_cell_cancels_and_keeps_the_kernel(shell, capsys):
    run(shell, "%load_model --n-ctx 2048")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    r = run(shell, "%%generate --max-tokens 4000 --ignore-eos\nOnce upon a time")
    timer.join()
    assert r.success, r.error_in_exec
    assert r.result.finish_reason == "cancelled"
    assert "[cancelled after" in capsys.readouterr().out
    r = run(shell, "%%generate --max-tokens 3\nHi")
    assert r.success and r.result.metrics.generated_tokens >= 1


def test_kv_magics(shell, capsys):
    run(shell, "%load_model --n-ctx 2048")
    run(shell, "%%generate --max-tokens 4 --temperature 0\n" + "The history of the printing "
        "press begins in the fifteenth century, when movable type changed how books were "
        "made, sold and read across Europe and beyond.")
    r = run(shell, "%kv save press")
    assert r.success, r.error_in_exec
    assert r.result["tokens"] >= 32
    r = run(shell, "%kv ls")
    assert "session press" in repr(r.result) and "RAM tier" in repr(r.result)
    assert run(shell, "%kv load press").success
    assert run(shell, "%kv rm press").success
    _shows_without_traceback(shell, "%kv save ../press", capsys, "invalid session name")
    _shows_without_traceback(shell, "%kv load", capsys, "needs a session name")
    _shows_without_traceback(shell, "%kv frobnicate", capsys, "invalid choice")


def test_chat_json_schema_from_a_variable_and_a_file(shell, capsys, tmp_path):
    run(shell, "%load_model default --n-ctx 2048")
    run(shell, "import pydantic\nclass Pet(pydantic.BaseModel):\n"
               "    name: str = pydantic.Field(max_length=12)\n    legs: int")
    r = run(shell, "%%chat --json-schema Pet --temperature 0 --max-tokens 48\nA pet as JSON.")
    assert r.success, r.error_in_exec
    assert type(r.result.parsed).__name__ == "Pet" and r.result.text in capsys.readouterr().out
    f = tmp_path / "s.json"
    f.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                 '"required": ["ok"], "additionalProperties": false}')
    r = run(shell, f"%%chat --json-schema {f} --temperature 0 --max-tokens 16\nOK?")
    assert r.success and set(r.result.parsed) == {"ok"}
    r = run(shell, "%%chat --json-schema nowhere.json\nhi")
    assert not r.success and "no such file" in str(r.error_in_exec)
