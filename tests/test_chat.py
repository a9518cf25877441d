"""Chats that remember: workbench.Chat and `%%chat --session`, with the real model through
the real worker, and the magics through a real InteractiveShell."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import workbench
from workbench.errors import WorkbenchError
from workbench.magics import show_stream
from workbench.results import Completion

SYSTEM = "You are a helpful assistant. Answer briefly, in one or two sentences."


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    yield sh


def test_follow_up_restores_the_earlier_turns_from_the_prefix_cache(loaded):
    chat = workbench.Chat(system=SYSTEM, temperature=0, max_tokens=24)
    first = chat.send("What is the capital of France?")
    second = chat("And of Italy?")
    third = chat.send("And of Spain?")
    assert len(chat) == 3 and [m["role"] for m in chat.history] == \
        ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert chat.history[2]["content"] == first.text  # stored as generated
    # Each follow-up computes only its new tokens: everything the previous request held
    # (its prompt and the answer's tokens, all but the last one sampled) comes back from
    # the cache.
    for before, after in ((first, second), (second, third)):
        m0, m1 = before.metrics, after.metrics
        assert m1.cached_tokens >= m0.prompt_tokens, (m0, m1)
        assert m1.cached_tokens <= m0.prompt_tokens + m0.generated_tokens
        assert m1.prompt_tokens - m1.cached_tokens < 20  # the new question and its markup


def test_streamed_answer_joins_the_history(loaded):
    chat = workbench.Chat(temperature=0, max_tokens=16)
    s = chat.send("Name a colour.", stream=True)
    text = "".join(s)
    assert chat.history == [{"role": "user", "content": "Name a colour."},
                            {"role": "assistant", "content": text}]
    chat.reset()
    assert chat.history == [] and len(chat) == 0


def test_save_and_load_continue_the_chat(loaded, tmp_path):
    chat = workbench.Chat(system=SYSTEM, name="geo", temperature=0, max_tokens=16)
    first = chat.send("What is the capital of France?")
    path = chat.save(tmp_path / "geo.json")
    data = json.loads(path.read_text())
    assert data["format"] == "workbench-chat" and data["settings"]["max_tokens"] == 16
    again = workbench.Chat.load(path)
    assert again.history == chat.history and again.name == "geo" and again.system == SYSTEM
    follow = again.send("And of Italy?")
    assert follow.metrics.cached_tokens >= first.metrics.prompt_tokens


def test_bad_names_paths_and_files(loaded, tmp_path):
    for name in ("../x", "a/b", "", "a b", "x" * 65):
        with pytest.raises(WorkbenchError, match="invalid chat name"):
            workbench.Chat(name=name)
    with pytest.raises(WorkbenchError, match="unknown setting"):
        workbench.Chat(temprature=0)
    with pytest.raises(WorkbenchError, match="cannot save"):
        workbench.Chat().save(tmp_path / "no" / "such" / "folder.json")
    bad = tmp_path / "bad.json"
    for text, why in (("{not json", "cannot read"), ("[]", "not a saved chat"),
                      ('{"format": "workbench-chat", "version": 1, "messages": '
                       '[{"role": "assistant", "content": "hi"}]}', "role 'user'"),
                      ('{"format": "workbench-chat", "version": 1, "messages": '
                       '[{"role": "user", "content": "hi"}]}', "no answer"),
                      ('{"format": "workbench-chat", "version": 1, "messages": [], '
                       '"settings": {"temperature": -1}}', "not a saved chat"),
                      ('{"format": "workbench-chat", "version": 9, "messages": []}', "version")):
        bad.write_text(text)
        with pytest.raises(WorkbenchError, match=why):
            workbench.Chat.load(bad)
    with pytest.raises(WorkbenchError, match="cannot read"):
        workbench.Chat.load(tmp_path / "missing.json")


def test_chat_session_magic_remembers_across_cells(shell, loaded, capsys, tmp_path):
    r1 = shell.run_cell(f"%%chat --session trip --temperature 0 --max-tokens 24 "
                        f"--system '{SYSTEM}'\nWhat is the capital of France?")
    assert r1.success, r1.error_in_exec
    r2 = shell.run_cell("%%chat --session trip --temperature 0 --max-tokens 24\n"
                        "And of Italy?")
    assert r2.success, r2.error_in_exec
    assert isinstance(r2.result, Completion)
    assert r2.result.metrics.cached_tokens >= r1.result.metrics.prompt_tokens
    assert f"({r2.result.metrics.cached_tokens} from the KV cache)" in repr(r2.result)
    out = capsys.readouterr().out
    assert r2.result.text.strip()[:20] in out  # plain text on a terminal

    h = shell.run_cell("%chat_history trip")
    assert h.success, h.error_in_exec
    chat = h.result
    assert chat.system == SYSTEM and len(chat) == 2
    assert "And of Italy?" in repr(chat) and "<table>" in chat._repr_html_()
    assert shell.run_cell("%chat_history").result == ["trip"]

    path = tmp_path / "trip.json"
    h = shell.run_cell(f"%chat_history trip --save {path} --reset")
    assert h.success, h.error_in_exec
    assert len(h.result) == 0 and len(workbench.Chat.load(path)) == 2


def test_chat_history_errors_show_without_a_traceback(shell, loaded, capsys, tmp_path):
    for line, message in (("%chat_history nobody", "no chat session 'nobody'"),
                          ("%chat_history ../etc", "invalid chat name"),
                          ("%%chat --session a/b\nhi", "invalid chat name")):
        r = shell.run_cell(line)
        assert isinstance(r.error_in_exec, WorkbenchError) and message in str(
            r.error_in_exec.message), (line, r.error_in_exec)
    shell.run_cell("%%chat --session keep --max-tokens 4\nhi")
    r = shell.run_cell(f"%chat_history keep --save {tmp_path}/missing/dir/x.json")
    assert isinstance(r.error_in_exec, WorkbenchError)
    assert "cannot save" in r.error_in_exec.message


def test_markdown_is_updated_in_place_while_it_streams(shell, loaded):
    s = workbench.chat("Write a list of three fruits, in Markdown.", temperature=0,
                       max_tokens=32, stream=True)
    with capture_output() as cap:
        done = show_stream(s, markdown=True)
    md = [o.data.get("text/markdown") for o in cap.outputs if "text/markdown" in o.data]
    assert md and md[-1].strip() == done.text.strip()


def test_interrupting_a_session_cell_keeps_the_partial_answer(shell, loaded, capsys):
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    r = shell.run_cell("%%chat --session story --max-tokens 4000 --ignore-eos\n"
                       "Tell me a long story.")
    timer.join()
    assert r.success, r.error_in_exec
    assert r.result.finish_reason == "cancelled" and r.result.text
    assert "[cancelled after" in capsys.readouterr().out
    chat = workbench.chat_session("story")
    assert chat.history[-1] == {"role": "assistant", "content": r.result.text}
    r = shell.run_cell("%%chat --session story --max-tokens 8\nGo on.")
    assert r.success and r.result.metrics.generated_tokens >= 1 and len(chat) == 2
