"""`workbench deploy` and the service it writes, with real processes: the default model
deployed, served over loopback, and driven with the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

import workbench
from workbench.serve.check import free_port, start, stop, wait_healthy

pytestmark = pytest.mark.timeout(600)
KEY = "test-key-5f1c"


def _deploy(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output",
                           str(out), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def service_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "ai-service"
    r = _deploy(out, "--device", "auto", "--quantization", "none", "--n-parallel", "4",
                "--n-ctx-per-request", "512")
    assert r.returncode == 0, r.stderr
    return out


class Service:
    def __init__(self, folder: Path, *extra: str, env: dict | None = None) -> None:
        self.folder, self.extra, self.env = folder, extra, env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = start(folder, self.port, *extra, env=env)
        wait_healthy(self.base, self.proc)
        self.name = json.loads((folder / "service.json").read_text())["model"]["name"]

    def client(self, key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, **kw)

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture(scope="module")
def service(service_dir):
    s = Service(service_dir)
    yield s
    s.stop()


def _raw(base: str, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(f"{base}{path}", data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


# ---- the bundle -------------------------------------------------------------------------

def test_the_bundle_holds_what_a_service_needs(service_dir, default_model):
    names = sorted(p.name for p in service_dir.iterdir())
    assert names == ["Dockerfile", "README.md", "app", "healthcheck.py", "model.gguf",
                     "requirements.txt", "service.json", "start.sh"]
    assert (service_dir / "app" / "workbench" / "serve" / "app.py").exists()
    assert not list(service_dir.rglob("__pycache__"))
    assert "llama-cpp-python==" in (service_dir / "requirements.txt").read_text()
    config = json.loads((service_dir / "service.json").read_text())
    assert config["model"]["quantization"] == "Q4_1"
    assert config["load"]["n_parallel"] == 4 and config["load"]["n_ctx"] == 2048
    assert config["server"]["host"] == "127.0.0.1"
    for key in ("quantization", "n_parallel", "n_ctx", "threads"):
        assert config["reasons"][key]
    from workbench.models.hashing import file_sha256

    assert config["model"]["sha256"] == file_sha256(default_model)
    assert os.access(service_dir / "start.sh", os.X_OK)
    readme = (service_dir / "README.md").read_text()
    assert "curl" in readme and "from openai import OpenAI" in readme
    assert config["model"]["name"] in readme


def test_deploy_quantizes_to_int8(tmp_path):
    out = tmp_path / "q8"
    r = _deploy(out, "--quantization", "int8", "--n-parallel", "2")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "service.json").read_text())
    assert config["model"]["quantization"] == "Q8_0"
    from workbench.models.gguf_file import read_header

    assert read_header(out / "model.gguf").quantization == "Q8_0"
    assert "Q8_0 from Q4_1" in config["reasons"]["quantization"]


def test_deploy_refuses_bad_arguments(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    r = _deploy(full)
    assert r.returncode == 1 and "exists and is not empty" in r.stderr and "--force" in r.stderr
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    r = _deploy(tmp_path / "new", "--quantization", "int3")
    assert r.returncode == 1 and "unknown quantization 'int3'" in r.stderr
    assert "int8" in r.stderr and "Q4_K_M" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()

    r = _deploy(tmp_path / "new", "--device", "tpu")
    assert r.returncode == 1 and "neither auto, cpu, gpu nor a saved profile" in r.stderr
    bad_profile = tmp_path / "profile.json"
    bad_profile.write_text("{}")
    r = _deploy(tmp_path / "new", "--device", str(bad_profile))
    assert r.returncode == 1 and "is not a saved device profile" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == sorted(["full", "profile.json"]) or \
        set(p.name for p in tmp_path.iterdir()) == {"full", "profile.json"}

    r = _deploy(full, "--force", "--n-parallel", "2")
    assert r.returncode == 0, r.stderr
    assert not (full / "keep.txt").exists() and (full / "service.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_deploy_for_a_saved_profile(tmp_path):
    profile = workbench.profile_device(measure=False, save=tmp_path / "target.json")
    data = json.loads((tmp_path / "target.json").read_text())
    assert data["physical_cores"] == profile.physical_cores
    out = tmp_path / "svc"
    r = _deploy(out, "--device", str(tmp_path / "target.json"), "--n-parallel", "2")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "service.json").read_text())
    assert config["target"] == str(tmp_path / "target.json")
    assert config["load"]["threads"] == profile.physical_cores


def test_start_sh_runs_the_folder_on_its_own_code(service_dir):
    port = free_port()
    proc = subprocess.Popen([str(service_dir / "start.sh"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONPATH": "", "PYTHON": sys.executable})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
            assert json.loads(r.read())["data"][0]["id"]
        import psutil

        # the service imports the folder's own copy of the workbench
        cmd = psutil.Process(proc.pid).environ()["PYTHONPATH"]
        assert cmd.startswith(str(service_dir / "app"))
    finally:
        stop(proc)


def test_deploy_check_runs_a_smoke_test(service_dir):
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--check",
                        str(service_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "service ok" in r.stdout and "[DONE]" in r.stdout


# ---- the official client ----------------------------------------------------------------

def test_openai_client_models_chat_and_stream(service, loaded):
    c = service.client()
    assert [m.id for m in c.models.list().data] == [service.name]
    question = "Name two planets."
    reply = c.chat.completions.create(model=service.name, temperature=0, max_tokens=24,
                                      messages=[{"role": "user", "content": question}])
    text = reply.choices[0].message.content
    mine = workbench.chat(question, temperature=0, max_tokens=24)
    assert text == mine.text  # greedy: the service's batch gives the engine's own answer
    assert reply.usage.completion_tokens == mine.metrics.generated_tokens
    assert reply.usage.prompt_tokens == mine.metrics.prompt_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")

    chunks = list(c.chat.completions.create(
        model=service.name, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": question}]))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    done = c.completions.create(model=service.name, prompt="The capital of France is",
                                temperature=0, max_tokens=12)
    assert done.choices[0].text == workbench.generate("The capital of France is",
                                                      temperature=0, max_tokens=12).text


def test_concurrent_requests_match_one_by_one(service, loaded):
    c = service.client()
    prompts = [f"Write one sentence about the number {i}." for i in range(6)]
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        r = c.chat.completions.create(model=service.name, temperature=0, max_tokens=20,
                                      messages=[{"role": "user", "content": prompts[i]}])
        out[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(6)] == [
        workbench.chat(p, temperature=0, max_tokens=20).text for p in prompts]


# ---- bad requests ---------------------------------------------------------------------------

def test_bad_requests_get_openai_errors_and_the_service_stays_up(service):
    b, name = service.base, service.name
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, None, "not valid JSON"),
        (json.dumps([1, 2]).encode(), 400, None, "JSON object"),
        (json.dumps({"model": name}).encode(), 400, "messages", "messages"),
        (json.dumps({"model": name, "messages": msgs, "temperature": "hot"}).encode(), 400,
         "temperature", "must be a number"),
        (json.dumps({"model": name, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
         400, "messages[0].role", "role"),
        (json.dumps({"model": name, "messages": msgs, "stream": "yes"}).encode(), 400,
         "stream", "true or false"),
        (json.dumps({"model": "gpt-9", "messages": msgs}).encode(), 404, "model",
         "does not exist"),
        (json.dumps({"model": name, "messages": msgs, "max_tokens": 0}).encode(), 400,
         "max_tokens", "between 1"),
        (json.dumps({"model": name, "messages": msgs, "max_tokens": -5}).encode(), 400,
         "max_tokens", "between 1"),
        (json.dumps({"model": name, "messages": msgs, "max_tokens": 10**9}).encode(), 400,
         "max_tokens", "more than this service's context"),
        (json.dumps({"model": name, "messages": msgs, "max_tokens": 2.5}).encode(), 400,
         "max_tokens", "integer"),
        (json.dumps({"model": name, "messages": [{"role": "user",
                                                  "content": "word " * 900}]}).encode(), 400,
         None, "longer than"),
    ]
    for body, status, param, words in cases:
        code, _, err = _raw(b, "POST", "/v1/chat/completions", body)
        assert code == status, (body[:60], code, err)
        assert words in err["error"]["message"], err
        assert err["error"]["param"] == param and err["error"]["type"]
    head = _send(service.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (2 << 20),
                 [b"x" * (2 << 20)])
    assert head.startswith(b"HTTP/1.1 413") and b"limit" in head
    code, _, err = _raw(b, "GET", "/v1/nothing-here")
    assert code == 404 and err["error"]["message"].startswith("no such endpoint")
    code, _, err = _raw(b, "GET", "/v1/chat/completions")
    assert code == 405
    # after all that, it serves
    code, _, health = _raw(b, "GET", "/health")
    assert code == 200 and health["status"] == "ok"
    r = service.client().chat.completions.create(model=name, messages=msgs, max_tokens=4)
    assert r.choices[0].message.content is not None


def _send(port: int, head: bytes, parts: list[bytes]) -> bytes:
    """Send a request as raw bytes (the server may answer and close before the body is
    all sent); returns the start of the response."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        try:
            for p in parts:
                s.sendall(p)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(30)
        # the head and the body may come in separate packets: read the whole response
        data = b""
        while True:
            try:
                chunk = s.recv(8192)
            except (ConnectionResetError, socket.timeout):
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if not chunk or (sep and length is not None and len(body) >= length):
                return data
        return data


def test_an_oversized_body_sent_in_chunks_is_refused(service):
    chunk = b"a" * 65536
    head = _send(service.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                 # 2.5 MiB, and no Content-Length to refuse it by
                 [b"%x\r\n" % len(chunk) + chunk + b"\r\n"] * 40)
    assert head.startswith(b"HTTP/1.1 413")


# ---- security -------------------------------------------------------------------------------

def test_api_key_and_binding(service_dir):
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "serve", str(service_dir),
                        "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "WORKBENCH_API_KEY"})
    assert r.returncode == 1 and "without an API key" in r.stderr
    assert "WORKBENCH_API_KEY" in r.stderr

    s = Service(service_dir, env={"WORKBENCH_API_KEY": KEY})
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            code, _, err = _raw(s.base, "GET", "/v1/models", headers=headers)
            assert code == 401 and err["error"]["code"] == "invalid_api_key", headers
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert [m.id for m in s.client(KEY).models.list().data] == [s.name]
        code, _, _ = _raw(s.base, "GET", "/health")  # health stays open for probes
        assert code == 200
    finally:
        s.stop()


# ---- load, disconnects, crashes -------------------------------------------------------------

def test_32_clients_get_answers_or_429s_and_nothing_hangs(service):
    c = service.client(max_retries=0, timeout=120)
    until = time.monotonic() + 20
    ttfts: list[float] = []
    tokens, refused, errors = [0], [0], []
    lock = threading.Lock()

    def client(i: int) -> None:
        while time.monotonic() < until:
            t0 = time.monotonic()
            try:
                first, n = None, 0
                for ch in c.chat.completions.create(
                        model=service.name, max_tokens=24, stream=True, temperature=0.7,
                        seed=i, messages=[{"role": "user", "content": f"Tell me fact {i}."}]):
                    if ch.choices and ch.choices[0].delta.content:
                        first = first or time.monotonic() - t0
                        n += 1
                with lock:
                    tokens[0] += n
                    if first is not None:
                        ttfts.append(first)
            except openai.RateLimitError as e:
                with lock:
                    refused[0] += 1
                assert int(e.response.headers["retry-after"]) >= 1
                time.sleep(0.5)
            except Exception as e:  # noqa: BLE001 - every other error fails the test
                with lock:
                    errors.append(repr(e))
                return

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    elapsed = time.monotonic() - started
    assert errors == []
    assert len(ttfts) >= 8 and refused[0] > 0  # 4 decode + 8 queued; the rest were told 429
    q = statistics.quantiles(ttfts, n=20)
    print(f"\n32 clients, {elapsed:.0f} s: {len(ttfts)} answers, {refused[0]} refused (429), "
          f"{tokens[0] / elapsed:.1f} tokens/s, TTFT p50 {statistics.median(ttfts):.2f} s "
          f"p95 {q[18]:.2f} s")
    code, _, health = _raw(service.base, "GET", "/health")
    assert code == 200 and health["in_flight"] == 0
    with urllib.request.urlopen(f"{service.base}/metrics") as r:
        metrics = r.read().decode()
    assert 'status="429"' in metrics and "workbench_ttft_seconds_bucket" in metrics


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_a_client_that_disconnects_stops_its_generation(service):
    cancelled = 'workbench_generations_total{reason="cancelled"}'
    before_cancelled = _metric(service.base, cancelled)
    before_tokens = _metric(service.base, "workbench_generated_tokens_total")
    body = json.dumps({"model": service.name, "prompt": "Once upon a time", "stream": True,
                       "max_tokens": 500, "temperature": 0.8}).encode()
    with socket.create_connection(("127.0.0.1", service.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        s.settimeout(60)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, _, health = _raw(service.base, "GET", "/health")
        if health["in_flight"] == 0:
            break
        time.sleep(0.2)
    assert health["in_flight"] == 0
    # the worker reports the generation as cancelled, well short of its 500 tokens
    deadline = time.monotonic() + 10
    while _metric(service.base, cancelled) == before_cancelled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(service.base, cancelled) == before_cancelled + 1
    assert _metric(service.base, "workbench_generated_tokens_total") - before_tokens < 400


def test_a_killed_service_gives_a_clean_error_and_restarts(service_dir):
    s = Service(service_dir)
    c = s.client(max_retries=0, timeout=60)
    stream = c.chat.completions.create(model=s.name, stream=True, max_tokens=400,
                                       temperature=0.8,
                                       messages=[{"role": "user", "content": "Tell a story."}])
    with pytest.raises(openai.APIError):
        for i, _ in enumerate(stream):
            if i == 3:
                os.killpg(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    again = Service(service_dir)
    try:
        r = again.client().chat.completions.create(
            model=again.name, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content
    finally:
        again.stop()


def test_generate_many_batches_and_matches_one_by_one(default_model):
    prompts = ["The sky is", "Two plus two is", "My favourite fruit is"]
    workbench.load_model(default_model, progress=False, n_ctx=2048, n_parallel=3)
    try:
        assert workbench.engine().model.n_parallel == 3
        many = workbench.generate_many(prompts, temperature=0, max_tokens=12)
        chats = workbench.generate_many(["Hi", [{"role": "user", "content": "Bye"}]],
                                        chat=True, temperature=0, max_tokens=8)
        # streamed pieces add up to the text, also the part held back for a stop string
        from workbench.config import GenerationConfig

        g = GenerationConfig(temperature=0, max_tokens=20, stop=("never-seen-text",))
        streams = [workbench.engine().stream("generate", p, g) for p in prompts]
        for s in streams:
            assert "".join(s) == s.text and s.text
    finally:
        workbench.load_model(default_model, progress=False, n_ctx=2048)
    assert [c.text for c in many] == [workbench.generate(p, temperature=0, max_tokens=12).text
                                      for p in prompts]
    assert chats[0].text == workbench.chat("Hi", temperature=0, max_tokens=8).text
    with pytest.raises(workbench.WorkbenchError, match="list of prompts"):
        workbench.generate_many("one prompt")


def _copy_with(service_dir: Path, dest: Path, **server) -> Path:
    """A second service folder sharing the model file, with other server settings."""
    import shutil

    shutil.copytree(service_dir, dest, copy_function=os.link)  # hard links: no 98 MB copy
    (dest / "service.json").unlink()  # rewritten below, not through the shared inode
    (dest / "service.json").write_text((service_dir / "service.json").read_text())
    config = json.loads((dest / "service.json").read_text())
    config["server"].update(server)
    (dest / "service.json").write_text(json.dumps(config))
    return dest


def _read_all(port: int, request: bytes, timeout: float = 20) -> bytes:
    """Send one request and read until the server closes or `timeout` passes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        sock.settimeout(timeout)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
                if got.endswith(b"0\r\n\r\n"):  # the last chunk of the response
                    break
        except TimeoutError:
            pass
        return got


def test_requests_past_their_timeout_are_stopped(service_dir, tmp_path):
    s = Service(_copy_with(service_dir, tmp_path / "slow", request_timeout_s=1.0))
    try:
        body = {"model": s.name, "prompt": "Once upon a time", "max_tokens": 500,
                "temperature": 0.8, "ignore": None}
        code, _, err = _raw(s.base, "POST", "/v1/completions", json.dumps(body).encode())
        assert code == 504 and err["error"]["code"] == "timeout"
        streamed = json.dumps({**body, "stream": True}).encode()
        got = _read_all(s.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                        % len(streamed) + streamed)
        assert got.startswith(b"HTTP/1.1 200") and b'"code": "timeout"' in got
        deadline = time.monotonic() + 10
        while _raw(s.base, "GET", "/health")[2]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _raw(s.base, "GET", "/health")[2]["in_flight"] == 0
    finally:
        s.stop()


def test_a_worker_crash_mid_request_is_a_503_and_the_next_request_works(service):
    _, _, health = _raw(service.base, "GET", "/health")
    worker = health["worker_pid"]
    c = service.client(max_retries=0, timeout=60)
    stream = c.completions.create(model=service.name, prompt="Once upon a time", stream=True,
                                  max_tokens=300, temperature=0.8)
    with pytest.raises(openai.APIError, match="engine worker"):
        for i, _ in enumerate(stream):
            if i == 2:
                os.kill(worker, signal.SIGKILL)
    r = c.completions.create(model=service.name, prompt="Hello", max_tokens=4)
    assert r.choices[0].text is not None
    _, _, health = _raw(service.base, "GET", "/health")
    assert health["status"] == "ok" and health["worker_pid"] != worker


def test_deploy_magic(tmp_path, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    out = tmp_path / "from-magic"
    r = sh.run_cell(f"%deploy --quantization int3 --output {out}")
    assert isinstance(r.error_in_exec, workbench.WorkbenchError)
    shown = capsys.readouterr()
    assert "unknown quantization 'int3'" in shown.out + shown.err
    assert "Traceback" not in shown.out + shown.err and not out.exists()
    r = sh.run_cell(f"%deploy --n-parallel 2 --output {out}")
    assert r.success, r.error_in_exec
    assert r.result.folder == out and (out / "service.json").exists()
    assert "Service written" in repr(r.result)
