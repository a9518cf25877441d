"""The tiered prefix cache against the real model: hits from RAM and disk give the same
answers as recomputing, damaged or foreign files are discarded, several engines share a
folder, budgets hold, a full disk falls back to RAM, and named sessions survive restarts."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import pytest

import workbench
from workbench.engine.client import Engine
from workbench.session import Session
from workbench.errors import WorkbenchError
from workbench.kvcache.cache import PrefixCache
from workbench.kvcache.store import read_entry, read_info, write_entry

DOC = inspect.getdoc(subprocess)[:2500]


def ask(question: str, **kw):
    return workbench.chat([{"role": "system", "content": DOC},
                           {"role": "user", "content": question}],
                          temperature=0, max_tokens=12, **kw)


@pytest.fixture()
def kv_dir(tmp_path, default_model):
    d = tmp_path / "kv"
    workbench.load_model(progress=False, n_ctx=2048, kv_dir=str(d))
    yield d
    workbench.load_model(progress=False, n_ctx=2048)


def entries(kv_dir: Path) -> list[Path]:
    return sorted(p for p in kv_dir.glob("*/*.wbkv"))


def test_ram_then_disk_hits_give_the_same_answer(kv_dir):
    cold = ask("What does Popen do?")
    assert cold.metrics.cached_tokens == 0
    warm = ask("What does Popen do?")
    assert warm.metrics.cache_tier == "ram"
    assert warm.metrics.cached_tokens == warm.metrics.prompt_tokens - 1
    assert warm.text == cold.text
    other = ask("How do I read the output?")  # shares the system prompt only
    assert other.metrics.cache_tier == "ram" and other.metrics.cached_tokens > 100
    workbench.engine().kv("clear_ram")
    assert entries(kv_dir)
    disk = ask("What does Popen do?")
    assert disk.metrics.cache_tier == "disk" and disk.text == cold.text
    stats = workbench.kv_stats()
    assert stats["hits_ram"] >= 2 and stats["hits_disk"] >= 1


def _plant(kv_dir: Path, mutate) -> Path:
    """Make one disk entry, then damage it with `mutate(path)`."""
    ask("What does Popen do?")
    workbench.engine().kv("clear_ram")
    (path,) = entries(kv_dir)
    mutate(path)
    return path


def _rewrite(path: Path, **changes) -> None:
    info = read_info(path)
    _, state = read_entry(path, namespace=info.namespace, model_sha256=info.model_sha256,
                          llama_cpp=info.llama_cpp)
    fields = dict(namespace=info.namespace, model_sha256=info.model_sha256,
                  llama_cpp=info.llama_cpp, tokens=info.tokens, state=state,
                  codec="zstd-shuffle")
    fields.update(changes)
    write_entry(path, **fields)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mutate", [
    _truncate,
    _flip,
    lambda p: _rewrite(p, model_sha256="0" * 64),
    lambda p: _rewrite(p, llama_cpp="0.0.1"),
], ids=["truncated", "flipped-bit", "other-model", "other-llama-cpp"])
def test_bad_cache_files_are_discarded_and_recomputed(kv_dir, mutate):
    cold = ask("What does Popen do?")
    path = _plant(kv_dir, mutate)
    # a new worker reads the folder afresh
    workbench.load_model(progress=False, n_ctx=2048, kv_dir=str(kv_dir))
    again = ask("What does Popen do?")
    assert again.metrics.cached_tokens == 0  # never restored
    assert again.text == cold.text
    assert not path.exists()  # thrown away


def test_two_engines_share_one_folder(kv_dir, default_model):
    other = Engine()
    try:
        Session(other).load(default_model, progress=False, n_ctx=2048, kv_dir=str(kv_dir))
        from workbench.config import GenerationConfig
        gen = GenerationConfig(temperature=0, max_tokens=6)
        errors = []

        def run(engine, tag):
            try:
                for i in range(3):
                    msgs = (("system", DOC), ("user", f"{tag} question {i}"))
                    engine.stream("chat", msgs, gen).result()
                engine.kv("clear_ram")  # both write to the folder at once
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(workbench.engine(), "a")),
                   threading.Thread(target=run, args=(other, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        files = entries(kv_dir)
        assert len(files) >= 2
        for p in files:  # every file is whole and valid
            info = read_info(p)
            read_entry(p, namespace=info.namespace, model_sha256=info.model_sha256,
                       llama_cpp=info.llama_cpp)
        assert not list(kv_dir.glob("*/.*.tmp"))
        hit = ask("a question 0")
        assert hit.metrics.cache_tier in ("ram", "disk") and hit.metrics.cached_tokens > 100
    finally:
        other.close()


def test_disk_budget_evicts_the_oldest(tmp_path, default_model):
    d = tmp_path / "kv"
    workbench.load_model(progress=False, n_ctx=2048, kv_dir=str(d), kv_disk_mib=8)
    try:
        for i in range(4):
            workbench.generate(f"{i} " + DOC, max_tokens=2, temperature=0)
        workbench.engine().kv("clear_ram")
        files = entries(d)
        total = sum(p.stat().st_size for p in files)
        assert total <= 8 << 20
        assert 1 <= len(files) < 4
        newest = workbench.generate("3 " + DOC, max_tokens=2, temperature=0)
        assert newest.metrics.cache_tier == "disk"
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_full_disk_falls_back_to_ram_and_says_so_once(tmp_path, default_model):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        workbench.load_model(progress=False, n_ctx=2048, kv_dir=str(mnt))
        e = workbench.engine()
        before = len(e.notices)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for i in range(3):
                workbench.generate(f"{i} " + DOC, max_tokens=2, temperature=0)
                e.kv("clear_ram")
        told = [n for n in e.notices[before:] if "full" in n]
        assert len(told) == 1 and "RAM" in told[0]
        # it goes on, in RAM
        workbench.generate("7 " + DOC, max_tokens=2, temperature=0)
        again = workbench.generate("7 " + DOC, max_tokens=2, temperature=0)
        assert again.metrics.cache_tier == "ram"
        assert not e.kv("stats")["disk_on"]
    finally:
        workbench.load_model(progress=False, n_ctx=2048)
        subprocess.run(["umount", str(mnt)])


def test_named_sessions_survive_a_worker_restart(kv_dir):
    cold = ask("What does Popen do?")
    saved = workbench.kv_save("subprocess-doc")
    assert saved["tokens"] >= cold.metrics.prompt_tokens
    assert "subprocess-doc" in repr(workbench.kv_list())
    shutil.rmtree(next(kv_dir.glob("*/")))  # only the named session is left
    workbench.engine().kill_worker()
    with pytest.raises(WorkbenchError):
        ask("x")  # reports the crash
    workbench.kv_load("subprocess-doc")
    again = ask("What does Popen do?")
    assert again.metrics.cached_tokens > 100 and again.text == cold.text
    workbench.kv_remove("subprocess-doc")
    assert "subprocess-doc" not in repr(workbench.kv_list())
    with pytest.raises(WorkbenchError, match="no KV session"):
        workbench.kv_load("subprocess-doc")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x/../../y", "", ".hidden"])
def test_session_names_with_paths_are_refused(loaded, name):
    with pytest.raises(WorkbenchError, match="invalid session name"):
        workbench.kv_save(name)


def test_quantized_kv_cache_reports_its_memory(default_model):
    f16 = workbench.load_model(progress=False, n_ctx=1024)
    q8 = workbench.load_model(progress=False, n_ctx=1024, type_k="q8_0", type_v="q8_0")
    try:
        assert q8.kv_bytes_per_token < f16.kv_bytes_per_token * 0.6
        assert "q8_0" in repr(q8)
        assert workbench.generate("Hello", max_tokens=3).metrics.generated_tokens == 3
        with pytest.raises(WorkbenchError, match="flash attention"):
            workbench.load_model(progress=False, type_v="q4_0", flash_attn="off")
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_admission_skips_what_recomputes_faster(tmp_path):
    c = PrefixCache(tmp_path, namespace="n" * 64, model_sha256="m" * 64, llama_cpp="x",
                    ram_bytes=1 << 30, disk_bytes=1 << 30)
    try:
        state = os.urandom(1 << 20)
        tokens = tuple(range(100))
        c.prompt_tps = 1e9  # a GPU that recomputes faster than any copy
        assert not c.offer(tokens, lambda: state)
        c.prompt_tps = 100.0  # a CPU: one second for 100 tokens
        assert c.offer(tokens, lambda: state)
        c.restore_bps["disk"] = 1.0  # a disk far too slow to be worth it
        c.clear_ram()
        assert c.stats["demoted"] == 0
    finally:
        c.close()
