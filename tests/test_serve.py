"""`workbench deploy` and the service it writes, with real processes: the default model
deployed, served over loopback, and driven with the official `openai` client."""

from __future__ import annotations

import json
import os
import re
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
    # kv/ is the prefix cache's, made when the service starts
    names = sorted(p.name for p in service_dir.iterdir() if p.name != "kv")
    assert names == [".dockerignore", "Dockerfile", "README.md", "app", "healthcheck.py",
                     "model.gguf", "requirements.txt", "service.json", "start.sh"]
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
    # on this machine's CPU: the CPU image, and the prefix cache on within stated budgets
    docker = (service_dir / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", docker, re.M) == ["python:3.11-slim"]
    assert "nvidia" not in docker and "--gpus" not in readme
    assert config["image"] == {"device": "cpu"}
    load = config["load"]
    assert load["kv_cache"] == "on" and load["kv_dir"] == "kv"
    assert 64 <= load["kv_ram_mib"] <= 8192 and 1024 <= load["kv_disk_mib"] <= 16384
    assert config["reasons"]["kv_cache"].startswith(f"on: {load['kv_ram_mib']:,} MiB of RAM")
    assert f"**{load['kv_ram_mib']:,} MiB of RAM** and **{load['kv_disk_mib']:,} MiB of disk**" \
        in readme
    assert "kv/\n" in (service_dir / ".dockerignore").read_text()


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


def test_deploy_for_a_gpu_writes_a_cuda_image(tmp_path):
    """No GPU here: the folder is for a GPU machine elsewhere, which chooses the GPU
    layers when the service starts there (and refuses to start without a GPU)."""
    out = tmp_path / "gpu"
    r = _deploy(out, "--device", "gpu", "--n-parallel", "2", "--kv-ram-mib", "300")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "service.json").read_text())
    docker = (out / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", docker, re.M))
    cuda, ubuntu = args["CUDA_VERSION"], args["UBUNTU_VERSION"]
    assert re.fullmatch(r"12\.\d+\.\d+", cuda) and ubuntu in ("22.04", "24.04")  # pinned
    assert re.findall(r"^FROM (.+)$", docker, re.M) == [
        "nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build",
        "nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}"]
    assert config["image"] == {"device": "gpu", "cuda": cuda,
                               "build": f"nvidia/cuda:{cuda}-devel-ubuntu{ubuntu}",
                               "run": f"nvidia/cuda:{cuda}-runtime-ubuntu{ubuntu}"}
    assert "COPY --from=build /opt/venv /opt/venv" in docker
    assert docker.rstrip().endswith('CMD ["./start.sh", "--host", "0.0.0.0"]')

    # the build stage's pip install, run as docker would (pip echoed, not run): llama.cpp
    # with CUDA and the RPC backend, from the workbench's own script, copied into the folder
    build = re.search(r"^RUN (args=.*?requirements\.txt)$", docker, re.M | re.S).group(1)
    assert "--no-binary llama-cpp-python" in build
    shown = subprocess.run(["sh", "-c", build.replace("pip install", "echo pip install")],
                           cwd=out, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "CUDA_ARCHITECTURES": ""})
    assert shown.returncode == 0, shown.stderr
    flags = re.search(r"^CMAKE_ARGS=(.*)$", shown.stdout, re.M).group(1).split()
    assert "-DGGML_CUDA=on" in flags and "-DGGML_RPC=on" in flags
    assert "-DGGML_NATIVE=off" in flags  # built on one machine, run on others
    repo_script = Path(__file__).resolve().parent.parent / "scripts" / "llama-cmake-args.sh"
    assert (out / "llama-cmake-args.sh").read_text() == repo_script.read_text()

    # started with GPU layers: the GPU is asked for, and the readme runs it with the GPUs
    load = config["load"]
    assert load["device"] == "gpu" and "n_gpu_layers" not in load
    assert "when the service starts" in config["reasons"]["n_gpu_layers"]
    readme = (out / "README.md").read_text()
    assert "docker run --gpus all" in readme and config["image"]["run"] in readme
    started = subprocess.run([sys.executable, "-m", "workbench.cli", "serve", str(out),
                              "--port", str(free_port())], capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 1 and "a GPU was asked for" in started.stderr

    # the prefix cache's budgets: given for RAM, derived for disk
    assert (load["kv_cache"], load["kv_ram_mib"], load["kv_dir"]) == ("on", 300, "kv")
    assert load["kv_disk_mib"] == 1200  # 4 times the RAM budget
    assert "300 MiB of RAM (given)" in config["reasons"]["kv_cache"]
    assert "**300 MiB of RAM** and **1,200 MiB of disk**" in readme


def test_deploy_with_the_kv_cache_off(tmp_path):
    out = tmp_path / "off"
    r = _deploy(out, "--kv-cache", "off", "--n-parallel", "2")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "service.json").read_text())
    assert config["load"]["kv_cache"] == "off" and "kv_ram_mib" not in config["load"]
    assert "Off (deployed with --kv-cache off)" in (out / "README.md").read_text()
    r = _deploy(tmp_path / "bad", "--kv-cache", "maybe")
    assert r.returncode == 1 and "kv_cache must be on or off" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()


def test_a_service_with_speculative_decoding(tmp_path):
    """--draft ngram: the batch checks n-gram drafts, /metrics counts them."""
    out = tmp_path / "spec"
    r = _deploy(out, "--draft", "ngram", "--n-parallel", "2", "--n-ctx-per-request", "1024")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "service.json").read_text())["load"]["draft"] == "ngram"
    s = Service(out)
    try:
        words = "red, green, blue, cyan, magenta, yellow, black, white, orange, purple"
        reply = s.client().chat.completions.create(
            model="default", temperature=0, max_tokens=80,
            messages=[{"role": "user", "content": f"Repeat this list three times: {words}"}])
        assert reply.choices[0].message.content
        text = urllib.request.urlopen(f"{s.base}/metrics", timeout=10).read().decode()
        counts = dict(re.findall(r"^(workbench_draft_\S+) (\d+)$", text, re.M))
        assert int(counts["workbench_draft_tokens_total"]) > 0
        assert 0 < int(counts["workbench_draft_accepted_tokens_total"]) <= \
            int(counts["workbench_draft_tokens_total"])
    finally:
        s.stop()
    r = _deploy(tmp_path / "bad", "--draft", "small.gguf")
    assert r.returncode == 1 and "draft must be off, ngram or auto" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()


def test_deploy_for_a_saved_profile(tmp_path):
    profile = workbench.profile_device(measure=False, save=tmp_path / "target.json")
    data = json.loads((tmp_path / "target.json").read_text())
    assert data["physical_cores"] == profile.physical_cores
    out = tmp_path / "svc"
    r = _deploy(out, "--device", str(tmp_path / "target.json"), "--n-parallel", "2")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "service.json").read_text())
    assert config["target"] == str(tmp_path / "target.json")
    # threads are the target's to choose when the service starts, from its idle cores
    assert "threads" not in config["load"] and "max_threads" not in config["load"]
    assert "when the service starts" in config["reasons"]["threads"]


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

    # Another question: asked again, this one would restore its prefix from the prefix
    # cache and decode only its last token, and llama.cpp's logits for a prompt decoded in
    # two batches differ from one batch's in the last bits, which can change a greedy pick.
    question = "Name two rivers."
    chunks = list(c.chat.completions.create(
        model=service.name, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": question}]))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    mine = workbench.chat(question, temperature=0, max_tokens=24)
    assert streamed == mine.text
    assert chunks[-1].usage.completion_tokens == mine.metrics.generated_tokens

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


def _kv_metrics(base: str) -> dict[str, float]:
    """The prefix cache's lines of /metrics, once the worker has reported them."""
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            text = r.read().decode()
        found = dict(re.findall(r"^(workbench_kv_cache_\S+) (\S+)$", text, re.M))
        if found.get("workbench_kv_cache_enabled") == "1" or time.monotonic() > deadline:
            return {k: float(v) for k, v in found.items()}
        time.sleep(0.25)


def test_a_shared_prefix_is_restored_and_counted_in_metrics(service, service_dir):
    load = json.loads((service_dir / "service.json").read_text())["load"]
    before = _kv_metrics(service.base)
    assert before["workbench_kv_cache_enabled"] == 1  # on by default, within its budgets
    assert before['workbench_kv_cache_budget_bytes{tier="ram"}'] == load["kv_ram_mib"] << 20
    assert before['workbench_kv_cache_budget_bytes{tier="disk"}'] == load["kv_disk_mib"] << 20
    assert (service_dir / "kv").is_dir()

    # two requests with the same long system prompt: the second restores it
    system = ("You are the librarian of a lighthouse. You answer in one short sentence, "
              "you never use lists, and you name a book whenever you can. ") * 4
    c = service.client()
    replies = [c.chat.completions.create(
        model=service.name, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in ("Name a fish.", "Name a bird.")]
    first, second = (r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert first == 0 and second >= 100, (first, second)

    hits = 'workbench_kv_cache_hits_total{tier="ram"}'
    deadline = time.monotonic() + 10  # the worker reports its counts once a second
    while (after := _kv_metrics(service.base))[hits] < before[hits] + 1:
        assert time.monotonic() < deadline, after
        time.sleep(0.25)
    assert after["workbench_kv_cache_tokens_saved_total"] >= \
        before["workbench_kv_cache_tokens_saved_total"] + second
    assert after["workbench_kv_cache_misses_total"] >= before["workbench_kv_cache_misses_total"] + 1
    assert 0 < after['workbench_kv_cache_bytes{tier="ram"}'] <= load["kv_ram_mib"] << 20


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


# ---- hostile requests ------------------------------------------------------------------------

def _stream_in_background(service, prompt: str = "Tell a long story about a lighthouse.",
                          max_tokens: int = 60):
    """A client streaming a chat answer meanwhile; returns (thread, its result dict)."""
    out: dict = {}

    def run() -> None:
        try:
            c = service.client(max_retries=0, timeout=120)
            parts, reason = [], None
            for ch in c.chat.completions.create(
                    model=service.name, stream=True, max_tokens=max_tokens, temperature=0.7,
                    seed=1, messages=[{"role": "user", "content": prompt}]):
                if ch.choices:
                    parts.append(ch.choices[0].delta.content or "")
                    reason = ch.choices[0].finish_reason or reason
            out["text"], out["reason"] = "".join(parts), reason
        except Exception as e:  # noqa: BLE001 - the test asserts there was none
            out["error"] = repr(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _chat(name: str, **fields) -> bytes:
    return json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4, **fields}).encode()


def test_a_lone_surrogate_anywhere_is_a_400_and_a_stream_meanwhile_finishes(service):
    b, name = service.base, service.name
    worker = _raw(b, "GET", "/health")[2]["worker_pid"]
    bad = "a\\ud800b"  # a JSON escape: valid JSON, not valid Unicode
    msgs = [{"role": "user", "content": "hi"}]
    cases = [  # (raw JSON body, path, the field named)
        (f'{{"model": "{name}", "messages": [{{"role": "user", "content": "{bad}"}}]}}',
         "/v1/chat/completions", "messages[0].content"),
        (f'{{"model": "{name}", "messages": [{{"role": "user", "content": [{{"type": "text", '
         f'"text": "{bad}"}}]}}]}}', "/v1/chat/completions", "messages[0].content[0].text"),
        (f'{{"model": "{name}", "messages": [{{"role": "system", "content": "{bad}"}}, '
         f'{{"role": "user", "content": "hi"}}]}}', "/v1/chat/completions",
         "messages[0].content"),
        (f'{{"model": "{name}", "messages": [{{"role": "{bad}", "content": "hi"}}]}}',
         "/v1/chat/completions", "messages[0].role"),
        (f'{{"model": "{name}", "messages": [{{"role": "user", "content": "hi", '
         f'"name": "{bad}"}}]}}', "/v1/chat/completions", "messages[0].name"),
        (f'{{"model": "{name}", "messages": {json.dumps(msgs)}, "stop": ["{bad}"]}}',
         "/v1/chat/completions", "stop[0]"),
        (f'{{"model": "{name}", "messages": {json.dumps(msgs)}, "user": "{bad}"}}',
         "/v1/chat/completions", "user"),
        (f'{{"model": "{bad}", "messages": {json.dumps(msgs)}}}', "/v1/chat/completions",
         "model"),
        (f'{{"model": "{name}", "messages": {json.dumps(msgs)}, "{bad}": 1}}',
         "/v1/chat/completions", "a key in the body"),
        (f'{{"model": "{name}", "prompt": "{bad}"}}', "/v1/completions", "prompt"),
        (f'{{"model": "{name}", "prompt": ["{bad}"]}}', "/v1/completions", "prompt[0]"),
        (f'{{"model": "{name}", "prompt": "hi", "stop": "{bad}"}}', "/v1/completions",
         "stop"),
    ]
    t, streamed = _stream_in_background(service)
    for body, path, param in cases:
        code, _, err = _raw(b, "POST", path, body.encode())
        assert code == 400, (body, code, err)
        assert "lone surrogate" in err["error"]["message"] and "character 1" in \
            err["error"]["message"], err
        assert err["error"]["param"] == param and err["error"]["code"] == "invalid_text"
    # the official client cannot send such text at all (it encodes JSON as UTF-8): only
    # a raw request, as above, reaches the service with it
    with pytest.raises(UnicodeEncodeError):
        service.client(max_retries=0).chat.completions.create(
            model=name, max_tokens=4, messages=[{"role": "user", "content": "x\udfff"}])
    t.join(150)
    assert "error" not in streamed and streamed["text"] and streamed["reason"], streamed
    health = _raw(b, "GET", "/health")[2]
    assert health["status"] == "ok" and health["worker_pid"] == worker  # never restarted


def test_nesting_sizes_and_fields_are_bounded(service):
    b, name = service.base, service.name
    deep = b"[" * 10_000 + b"]" * 10_000
    for body in (deep, b'{"model": "x", "messages": ' + deep + b"}",
                 b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        code, _, err = _raw(b, "POST", "/v1/chat/completions", body)
        assert code == 400 and "nests deeper than 32 levels" in err["error"]["message"], err
    nested = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}],
                         "metadata": json.loads("[" * 40 + "]" * 40)})
    code, _, err = _raw(b, "POST", "/v1/chat/completions", nested.encode())
    assert code == 400 and err["error"]["code"] == "too_deep"
    assert err["error"]["param"].startswith("metadata")
    cases = [
        (_chat(name, messages=[{"role": "user", "content": "x"}] * 1025), "messages",
         "the limit is 1,024"),
        (_chat(name, stop=["a", "b", "c", "d", "e"]), "stop", "up to 4"),
        (_chat(name, logit_bias={str(i): 1 for i in range(1025)}), "logit_bias",
         "the limit is 1,024"),
        (_chat(name, tools=[{"type": "function"}] * 5000), "tools", "the limit is 4,096"),
        (_chat(name, logprobs=True, top_logprobs=1000), "top_logprobs", "between 0 and 20"),
        (_chat(name, top_logprobs=2), "top_logprobs", "needs 'logprobs': true"),
        (_chat(name, logprobs="yes"), "logprobs", "true or false"),
        (_chat(name, n=2), "n", "not supported"),
        (_chat(name, response_format={"type": "xml"}), "response_format.type",
         "must be text, json_object or json_schema"),
        (_chat(name, frobnicate=1), "frobnicate", "unknown field"),
        (_chat(name, stream_options={"include_usage": True, "x": 1}), "stream_options.x",
         "not supported"),
        (_chat(name, messages=[{"role": "user", "content": "hi", "tool_calls": []}]),
         "messages[0].tool_calls", "not supported"),
        (_chat(name, messages=[{"role": "user", "content": "hi", "name": "bob"}]),
         "messages[0].name", "not supported"),
        (_chat(name, presence_penalty=3), "presence_penalty", "between -2 and 2"),
    ]
    for body, param, words in cases:
        code, _, err = _raw(b, "POST", "/v1/chat/completions", body)
        assert code == 400 and err["error"]["param"] == param, (param, code, err)
        assert words in err["error"]["message"], err
    # fields that ask for nothing are accepted, and null is absent
    code, _, r = _raw(b, "POST", "/v1/chat/completions",
                      _chat(name, n=1, logprobs=False, tools=None, user="student-7",
                            presence_penalty=0.5, frequency_penalty=0.5))
    assert code == 200 and r["choices"][0]["message"]["content"] is not None
    assert _raw(b, "GET", "/health")[0] == 200


def test_logit_bias_is_checked_and_honored(service, loaded):
    b, name = service.base, service.name
    for bias, param, words in (({"49152": 5}, "logit_bias.49152", "outside this model's "
                                 "vocabulary (0..49151)"),
                                ({"-1": 5}, "logit_bias", "token ids"),
                                ({"hello": 5}, "logit_bias", "token ids"),
                                ({"1.5": 5}, "logit_bias", "token ids"),
                                ({"42": 101}, "logit_bias.42", "between -100 and 100"),
                                ({"42": "x"}, "logit_bias.42", "must be a number"),
                                ([1, 2], "logit_bias", "must be an object")):
        code, _, err = _raw(b, "POST", "/v1/chat/completions", _chat(name, logit_bias=bias))
        assert code == 400 and err["error"]["param"] == param, (bias, err)
        assert words in err["error"]["message"], err
    c = service.client(max_retries=0, timeout=60)
    plain = c.completions.create(model=name, prompt="The capital of France is", max_tokens=6,
                                 temperature=0)
    # +100 forces a token (id 30: '.' in SmolLM2's vocabulary), -100 bans it
    forced = c.completions.create(model=name, prompt="The capital of France is",
                                  max_tokens=6, temperature=0, logit_bias={"30": 100})
    assert forced.choices[0].text == "." * 6 and plain.choices[0].text != forced.choices[0].text
    # -100 bans: the greedy first token (its id from the engine in this process) is not
    # chosen again
    s = workbench.generate("The capital of France is", stream=True, max_tokens=1,
                           temperature=0)
    first = "".join(s)
    r = c.completions.create(model=name, prompt="The capital of France is", max_tokens=1,
                             temperature=0, logit_bias={str(s.token_ids[0]): -100})
    assert plain.choices[0].text.startswith(first) and r.choices[0].text != first
    # the penalties are honored too: greedy counting stops repeating itself
    count = [c.completions.create(model=name, prompt="1, 2, 3, 4, 5,", max_tokens=24,
                                  temperature=0, **kw).choices[0].text
             for kw in ({}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0})]
    assert count[0].startswith(" 6, 7, 8") and count[1] != count[0] and count[2] != count[0]


# ---- structured output, sampling controls ---------------------------------------------------

_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "mood": {"enum": ["happy", "sad", "calm"]}},
     "required": ["ok", "mood"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "$defs": {"P": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
        "additionalProperties": False}},
     "properties": {"from": {"$ref": "#/$defs/P"}, "to": {"$ref": "#/$defs/P"}},
     "required": ["from", "to"], "additionalProperties": False},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                      "tag": {"anyOf": [{"type": "null"},
                                                        {"type": "string", "maxLength": 8}]}},
     "required": ["day", "tag"], "additionalProperties": False},
]


def test_openai_parse_helper_gets_a_parsed_pydantic_object(service):
    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)
        capital: bool

    c = service.client(max_retries=0, timeout=60)
    r = c.chat.completions.parse(model=service.name, response_format=City, max_tokens=64,
                                 temperature=0, messages=[
                                     {"role": "developer", "content": "Answer in JSON."},
                                     {"role": "user", "content": "Describe Paris."}])
    assert isinstance(r.choices[0].message.parsed, City), r.choices[0].message.content
    o = c.chat.completions.create(model=service.name, max_tokens=64, temperature=0,
                                  response_format={"type": "json_object"},
                                  messages=[{"role": "user", "content":
                                             'Reply with exactly {"color": "blue"}'}])
    assert isinstance(json.loads(o.choices[0].message.content), dict)


def test_schema_validity_50_generations_over_5_schemas(service):
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    c = service.client(max_retries=0, timeout=120)

    def one(i: int) -> tuple[dict, str]:
        schema = _SCHEMAS[i % 5]
        r = c.chat.completions.create(
            model=service.name, max_tokens=128, temperature=1.0, seed=i,
            messages=[{"role": "user", "content": f"Example {i}: some data, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {
                "name": f"s{i % 5}", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return schema, r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # the batch path: several decode together
        results = list(pool.map(one, range(50)))
    for schema, text in results:
        jsonschema.validate(json.loads(text), schema)


def test_same_seed_same_text_and_model_by_id(service):
    c = service.client(max_retries=0, timeout=60)
    texts = {c.chat.completions.create(model=service.name, max_tokens=24, temperature=1.0,
                                       seed=1234, messages=[{"role": "user", "content":
                                                             "Invent a word."}]
                                       ).choices[0].message.content for _ in range(3)}
    assert len(texts) == 1
    assert c.models.retrieve(service.name).id == service.name
    code, _, err = _raw(service.base, "GET", "/v1/models/gpt-9")
    assert code == 404 and err["error"]["code"] == "model_not_found"


def test_bad_schemas_are_400s_naming_the_construct(service):
    b, name = service.base, service.name

    def fmt(schema: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

    cases = [
        (fmt({"$defs": {"A": {"type": "array", "items": {"$ref": "#/$defs/A"}}},
              "$ref": "#/$defs/A"}), "$ref cycle"),
        (fmt({"type": "object", "patternProperties": {"^a": {}}}), "'patternProperties'"),
        (fmt({"type": "integer", "minimum": 0}), "'minimum'"),
        (fmt({"$ref": "https://example.com/x.json"}), "only local references"),
    ]
    for response_format, words in cases:
        code, _, err = _raw(b, "POST", "/v1/chat/completions",
                            _chat(name, response_format=response_format))
        assert code == 400 and words in err["error"]["message"], err
        assert err["error"]["param"] == "response_format.json_schema.schema"
    code, _, err = _raw(b, "POST", "/v1/chat/completions",
                        _chat(name, response_format={"type": "json_schema"}))
    assert code == 400 and err["error"]["param"] == "response_format.json_schema"
    assert _raw(b, "GET", "/health")[0] == 200


_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
_TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now.",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


def test_tool_calls_forced_streamed_and_answered(service):
    import jsonschema

    c = service.client(max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = c.chat.completions.create(model=service.name, messages=ask, max_tokens=64,
                                      temperature=0, tools=[_WEATHER, _TIME],
                                      tool_choice=choice)
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name in ("get_weather", "get_time") and call.id
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments),
                                _WEATHER["function"]["parameters"])
    chunks = list(c.chat.completions.create(
        model=service.name, messages=ask, max_tokens=64, temperature=0, stream=True,
        tools=[_WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 1 and all(d.index == 0 for d in deltas)
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    jsonschema.validate(args, _WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the history; the model answers in text
    r = c.chat.completions.create(model=service.name, max_tokens=24, temperature=0,
                                  tools=[_WEATHER], tool_choice="none", messages=ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}])
    assert r.choices[0].message.content and r.choices[0].finish_reason != "tool_calls"
    r = c.chat.completions.create(model=service.name, messages=ask, max_tokens=48,
                                  temperature=0, tools=[_WEATHER])  # auto: text or a call
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_logprobs_whole_and_streamed(service):
    import math

    c = service.client(max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "Name a color."}]
    r = c.chat.completions.create(model=service.name, messages=ask, max_tokens=8,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-6)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    # another question: asked again, its prefix would come from the prefix cache (see
    # test_openai_client_models_chat_and_stream)
    chunks = list(c.chat.completions.create(
        model=service.name, max_tokens=8, temperature=0, logprobs=True, stream=True,
        messages=[{"role": "user", "content": "Name a fruit."}]))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed and "".join(t.token for t in streamed) == text
    assert all(t.top_logprobs == [] for t in streamed)
    plain = c.chat.completions.create(model=service.name, messages=ask, max_tokens=8,
                                      temperature=0)
    assert plain.choices[0].logprobs is None


def test_bad_tools_are_400s(service):
    b, name = service.base, service.name
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "patternProperties": {"^a": {}}}}}
    cases = [
        (_chat(name, tools=[bad_params]), "tools[0].function.parameters", "patternProperties"),
        (_chat(name, tools=[{"type": "function", "function": {"name": "no spaces"}}]),
         "tools[0].function.name", "letters, digits"),
        (_chat(name, tools=[_WEATHER], tool_choice={"type": "function",
                                                    "function": {"name": "launch"}}),
         "tool_choice", "does not declare"),
        (_chat(name, tool_choice="required"), "tool_choice", "declares no 'tools'"),
        (_chat(name, messages=[{"role": "assistant", "tool_calls": [{"function": {
            "name": "f", "arguments": "{not json"}}]}]), "messages[0].tool_calls",
         "arguments"),
    ]
    for body, param, words in cases:
        code, _, err = _raw(b, "POST", "/v1/chat/completions", body)
        assert code == 400 and err["error"]["param"] == param, (param, err)
        assert words in err["error"]["message"], err
    assert _raw(b, "GET", "/health")[0] == 200


def test_model_aliases_and_placeholders(service):
    b, name = service.base, service.name
    c = service.client(max_retries=0, timeout=60)
    r = c.chat.completions.create(model="default", max_tokens=4,
                                  messages=[{"role": "user", "content": "Hi"}])
    assert r.model == name and r.choices[0].message.content is not None
    for placeholder in ("gpt-4o", "x"):
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model=placeholder, max_tokens=4,
                                      messages=[{"role": "user", "content": "Hi"}])
        err = e.value.body
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert f"'{name}'" in err["message"] and "'default'" in err["message"]
    # a placeholder does not hide the request's other mistakes
    code, _, err = _raw(b, "POST", "/v1/chat/completions",
                        _chat("gpt-4o", temperature="hot"))
    assert code == 400 and err["error"]["param"] == "temperature"


def test_a_failure_inside_the_worker_fails_that_request_only(service_dir):
    s = Service(service_dir, env={"WORKBENCH_FAULT": "decode:POISON"})
    try:
        worker = _raw(s.base, "GET", "/health")[2]["worker_pid"]
        c = s.client(max_retries=0, timeout=120)
        results: dict[int, object] = {}

        def ask(i: int) -> None:
            prompt = "POISON story" if i == 2 else f"Tell me fact number {i}."
            try:
                r = c.chat.completions.create(model=s.name, max_tokens=24, temperature=0,
                                              messages=[{"role": "user", "content": prompt}])
                results[i] = r.choices[0].message.content
            except openai.APIError as e:
                results[i] = e

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        bad = results[2]
        assert isinstance(bad, openai.InternalServerError), bad
        assert bad.body["code"] == "engine_error" and "Traceback" not in str(bad.body)
        for i in (0, 1, 3):
            assert isinstance(results[i], str) and results[i], results
        # streamed: the error arrives as an event, as JSON
        got = _read_all(s.port, _post_stream(s.name, "POISON again"))
        assert got.startswith(b"HTTP/1.1 200") and b'"code": "engine_error"' in got
        # and at the first stage a request is read
        health = _raw(s.base, "GET", "/health")[2]
        assert health["worker_pid"] == worker and health["in_flight"] == 0
    finally:
        s.stop()
    s = Service(service_dir, env={"WORKBENCH_FAULT": "prompt:POISON"})
    try:
        code, _, err = _raw(s.base, "POST", "/v1/completions", json.dumps(
            {"model": s.name, "prompt": "POISON", "max_tokens": 4}).encode())
        assert code == 500 and err["error"]["code"] == "engine_error"
        r = s.client(max_retries=0).completions.create(model=s.name, prompt="Hello",
                                                       max_tokens=4)
        assert r.choices[0].text is not None
    finally:
        s.stop()


def _post_stream(name: str, content: str) -> bytes:
    body = json.dumps({"model": name, "stream": True, "max_tokens": 24, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


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


def test_64_requests_at_once_on_a_busy_machine_all_answered(service, busy_core):
    """Another process keeps a core busy. 64 requests sent at once: each completes or gets
    429 with Retry-After, and every admitted one completes within its timeout."""
    c = service.client(max_retries=0, timeout=150)
    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(64)

    def client(i: int) -> None:
        gate.wait()
        try:
            r = c.chat.completions.create(model=service.name, max_tokens=16, temperature=0.7,
                                          seed=i, messages=[{"role": "user",
                                                             "content": f"Say fact {i}."}])
            result = "done" if r.choices[0].message.content is not None else "empty"
        except openai.RateLimitError as e:
            result = "429" if int(e.response.headers["retry-after"]) >= 1 else "429-no-retry"
        except Exception as e:  # noqa: BLE001 - a timeout or an error fails the test
            result = repr(e)
        with lock:
            outcomes.append(result)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    elapsed = time.monotonic() - started
    assert len(outcomes) == 64
    odd = [o for o in outcomes if o not in ("done", "429")]
    assert odd == [], odd
    done = outcomes.count("done")
    assert done >= 4  # at least the batch was admitted
    print(f"\n64 at once, {busy_core} core(s) busy elsewhere: {done} completed, "
          f"{outcomes.count('429')} told 429, in {elapsed:.1f} s")


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
