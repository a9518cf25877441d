"""The engine against the real default model: generation, streaming, concurrency,
cancellation, crashes and restarts, and bad requests."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

import workbench
from workbench.engine.protocol import RequestMetrics
from workbench.errors import EngineCrashed, GenerationError, WorkbenchError

from gguf_edit import with_strings


def test_greedy_generation_is_deterministic_and_measured(loaded):
    a = workbench.generate("The capital of France is", max_tokens=12, temperature=0)
    b = workbench.generate("The capital of France is", max_tokens=12, temperature=0)
    assert a.text == b.text and a.text.strip()
    m = a.metrics
    assert isinstance(m, RequestMetrics)
    assert m.generated_tokens == 12 and m.finish_reason == "length"
    assert m.prompt_tokens >= 5 and m.prompt_tps > 0 and m.decode_tps > 0
    assert 0 < m.ttft_s < 30
    assert m.rss_bytes > 50 * 2**20
    assert m.gpu_bytes is None  # no GPU here


def test_chat_uses_the_models_template(loaded):
    c = workbench.chat("What is the capital of France? Answer in one word.", temperature=0,
                       max_tokens=20)
    assert "Paris" in c.text
    assert c.metrics.kind == "chat"
    # the template's system prompt and markers make the prompt much longer than the question
    assert c.metrics.prompt_tokens > 20


def test_token_ids_prompt(loaded):
    ids = [1, 9690, 198]
    c = workbench.generate(ids, max_tokens=3, temperature=0)
    assert c.metrics.prompt_tokens == 3
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        workbench.generate([10**7], max_tokens=3)


def test_streaming_yields_tokens_as_they_come(loaded):
    s = workbench.generate("Count: one, two, three,", stream=True, max_tokens=16, temperature=0)
    times, pieces = [], []
    for piece in s:
        times.append(time.monotonic())
        pieces.append(piece)
    assert len(pieces) == 16
    assert "".join(pieces) == s.text
    assert s.metrics.generated_tokens == 16
    assert times[-1] - times[0] > 0  # spread out, not delivered all at once at the end


def test_async_iteration(loaded):
    async def collect():
        s = workbench.chat("Say hello.", stream=True, max_tokens=8, temperature=0)
        return [p async for p in s], s

    pieces, s = asyncio.run(collect())
    assert "".join(pieces) == s.text and s.metrics.generated_tokens >= 1


def test_several_requests_in_flight(loaded):
    s1 = workbench.generate("Alpha beta gamma", stream=True, max_tokens=6, temperature=0)
    s2 = workbench.generate("One two three", stream=True, max_tokens=6, temperature=0)
    assert s1.id != s2.id
    # read the second first: replies are routed by id, not by order
    t2 = s2.result().text
    t1 = s1.result().text
    assert t1 == workbench.generate("Alpha beta gamma", max_tokens=6, temperature=0).text
    assert t2 == workbench.generate("One two three", max_tokens=6, temperature=0).text


def _interrupt_after(delay: float) -> threading.Timer:
    t = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_keyboard_interrupt_cancels_within_a_token(loaded):
    s = workbench.generate("Once upon a time", stream=True, max_tokens=2000, temperature=0,
                           ignore_eos=True)
    seen = 0
    with pytest.raises(KeyboardInterrupt):
        for _ in s:
            seen += 1
            if seen == 5:
                _interrupt_after(0.05)
    assert s.finish_reason == "cancelled"
    # The worker saw the cancel before its next token: at most one token past what had
    # been produced when the interrupt arrived (a few in flight in the queue).
    assert s.metrics.generated_tokens < seen + 10
    # the engine is ready for the next request
    assert workbench.generate("Hi", max_tokens=2, temperature=0).metrics.generated_tokens == 2


def test_cancelling_an_async_task_cancels_the_request(loaded):
    async def run():
        s = workbench.generate("Once upon a time", stream=True, max_tokens=2000,
                               ignore_eos=True)

        async def consume():
            async for _ in s:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return s

    s = asyncio.run(run())
    s.cancel()
    assert s.finish_reason == "cancelled"
    assert workbench.generate("Hi", max_tokens=2).metrics.generated_tokens == 2


def test_killed_worker_gives_an_error_then_restarts(loaded):
    e = workbench.engine()
    pid = e.pid
    s = workbench.generate("Once upon a time", stream=True, max_tokens=2000, ignore_eos=True)
    with pytest.raises(EngineCrashed) as info:
        for i, _ in enumerate(s):
            if i == 3:
                os.kill(pid, signal.SIGKILL)
    msg = info.value.message
    assert "SIGKILL" in msg and s.id in msg and str(pid) in msg
    assert "reloads SmolLM2-135M-Instruct" in info.value.hint
    # the next call starts a new worker and reloads the model by itself
    c = workbench.generate("Hello", max_tokens=3, temperature=0)
    assert c.metrics.generated_tokens == 3
    assert e.pid != pid and e.restarts >= 1
    assert workbench.status().state == "ready"


def test_prompt_longer_than_context(loaded):
    long = "word " * 3000
    with pytest.raises(GenerationError) as info:
        workbench.generate(long, max_tokens=4)
    assert "2,048" in info.value.message and "longer than the context" in info.value.message
    assert "--n-ctx" in info.value.hint


@pytest.mark.parametrize("params, name", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temprature": 0.3}, "temprature"),
    ({"stop": [""]}, "stop"),
    ({"stop": [3]}, "stop"),
])
def test_invalid_generation_parameters(loaded, params, name):
    with pytest.raises(WorkbenchError) as info:
        workbench.generate("Hi", **params)
    assert name in info.value.message and info.value.hint


def test_no_model_loaded(default_model):
    workbench.unload()
    with pytest.raises(GenerationError) as info:
        workbench.chat("Hi")
    assert "no model is loaded" in info.value.message
    assert "%load_model" in info.value.hint
    workbench.load_model(progress=False, n_ctx=2048)


def test_chat_template_escaping_the_sandbox_is_refused(tmp_path, loaded, default_model):
    evil = ("{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
            "{% if c.__name__ == 'Popen' %}{{ c(['touch', '" + str(tmp_path / "pwned") +
            "']) }}{% endif %}{% endfor %}")
    p = with_strings(default_model, tmp_path / "evil.gguf", {"tokenizer.chat_template": evil})
    workbench.load_model(p, progress=False, n_ctx=2048)
    try:
        with pytest.raises(GenerationError) as info:
            workbench.chat("Hi")
        assert "unsafe" in info.value.message and info.value.hint
        assert not (tmp_path / "pwned").exists()
        # raw generation still works with this model, and so does the engine
        assert workbench.generate("Hi", max_tokens=2).metrics.generated_tokens == 2
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_metrics_table_and_log(loaded):
    import json

    from workbench import _paths

    workbench.generate("Metrics please", max_tokens=4, temperature=0)
    table = workbench.metrics()
    assert len(table) >= 1
    last = table[-1]
    assert last["generated_tokens"] == 4 and last["decode_tps"] > 0
    assert "decode_tps" in table._repr_html_() and "ttft_s" in repr(table)
    lines = _paths.metrics_log().read_text().splitlines()
    assert json.loads(lines[-1])["request_id"] == last["request_id"]
    assert len(workbench.metrics(all_sessions=True)) >= len(table)


def test_backend_sampling_gives_the_same_greedy_tokens(loaded, default_model):
    host = workbench.generate("The capital of France is", max_tokens=10, temperature=0)
    workbench.load_model(progress=False, n_ctx=2048, backend_sampling="on")
    try:
        backend = workbench.generate("The capital of France is", max_tokens=10, temperature=0)
        assert backend.text == host.text
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_worker_exits_when_its_kernel_dies(tmp_path):
    """A kernel killed outright (OOM, kill -9) must not leave its model loaded forever."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "kernel.py"
    script.write_text(
        "import sys, time, workbench\n"
        "if __name__ == '__main__':\n"
        "    workbench.load_model(progress=False, n_ctx=256)\n"
        "    print(workbench.engine().pid, flush=True)\n"
        "    time.sleep(600)\n")
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(kernel.stdout.readline())
        assert psutil.pid_exists(worker_pid)
        kernel.kill()
        kernel.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the worker outlived its kernel by 10 s")
    finally:
        kernel.kill()
