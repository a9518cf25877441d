"""Fine-tuning: data checks, checkpoints (atomic, verified, never unpickled, a full
disk), real training runs of the default model through the training process, kill -9
and resume, the GGUF LoRA in llama.cpp, and the magic."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import workbench
from workbench.errors import WorkbenchError
from workbench.finetune.checkpoint import AsyncCheckpointer, CheckpointStore
from workbench.finetune.data import read_data, split

SYSTEM = "You are the Workbench help desk. Answer in one sentence."
DATA = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "workbench-help.jsonl"
FAST = dict(batch_size=2, max_len=96, rank=4, eval_every=100)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def small_data(tmp_path: Path, n: int = 12) -> Path:
    lines = DATA.read_text().splitlines()
    random.Random(1).shuffle(lines)
    return write_jsonl(tmp_path / "small.jsonl", lines[:n])


# ---- data ----------------------------------------------------------------------

def test_the_package_never_hides_the_function():
    """`workbench.finetune` is the function, also after a submodule of the package of the
    same name is imported (which binds the submodule's name on its parent)."""
    import importlib

    importlib.import_module("workbench.finetune.export")
    assert callable(workbench.finetune) and workbench.finetune.__module__ == "workbench.api"


def test_data_formats_and_bad_data(tmp_path):
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    pair = json.dumps({"prompt": "2+2?", "completion": "4", "system": "Be brief."})
    recs = read_data(write_jsonl(tmp_path / "ok.jsonl", [chat, "", pair]))
    assert [r.messages[-1] for r in recs] == [("assistant", "hello"), ("assistant", "4")]
    assert recs[1].messages[0] == ("system", "Be brief.")
    (tmp_path / "notes.txt").write_text("First paragraph.\n\nSecond one.\n\n\n")
    assert [r.text for r in read_data(tmp_path / "notes.txt")] == ["First paragraph.",
                                                                  "Second one."]

    with pytest.raises(WorkbenchError, match=r"line 3 of bad\.jsonl is not valid JSON"):
        read_data(write_jsonl(tmp_path / "bad.jsonl", [chat, pair, '{"prompt": "x",']))
    with pytest.raises(WorkbenchError, match="line 1 of shape.jsonl has neither"):
        read_data(write_jsonl(tmp_path / "shape.jsonl", ['{"question": "x"}']))
    with pytest.raises(WorkbenchError, match="no assistant message"):
        read_data([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(WorkbenchError, match="empty.jsonl holds no examples"):
        read_data(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(WorkbenchError, match="no data file"):
        read_data(tmp_path / "missing.jsonl")
    with pytest.raises(WorkbenchError, match="too few"):
        split(read_data([json.loads(pair)]), 0.1, 0)
    train, val = split(read_data(DATA), 0.1, seed=0)
    assert len(val) == 8 and len(train) == 76 and not set(train) & set(val)


def test_tokenization_trains_on_replies_and_says_what_it_truncated(default_model):
    from workbench.finetune.data import tokenize
    from workbench.models.gguf_file import read_header
    from workbench.models.hf import load_tokenizer

    tok = load_tokenizer(default_model)
    template = read_header(default_model).chat_template
    recs = read_data([{"prompt": "Name a colour.", "completion": "Blue.", "system": SYSTEM},
                      {"prompt": "word " * 300, "completion": "Done."}])
    out, warnings = tokenize(recs, tok, template, tok.bos_token, tok.eos_token, max_len=512,
                             truncate=True)
    trained = tok.decode([t for t in out[0].labels if t != -100])
    assert trained.startswith("Blue.") and "Name a colour" not in trained
    assert "<|im_end|>" in trained  # the model learns to stop
    assert warnings == []
    out, warnings = tokenize(recs, tok, template, tok.bos_token, tok.eos_token, max_len=64,
                             truncate=True)
    # the long example lost its reply to truncation, so it is dropped, and both are said
    assert "example 2" in warnings[0] and "truncated" in warnings[0]
    assert "dropped: example 2" in warnings[1] and len(out) == 1
    with pytest.raises(WorkbenchError, match=r"longer than max_len=64 tokens: example 2"):
        tokenize(recs, tok, template, tok.bos_token, tok.eos_token, max_len=64,
                 truncate=False)


# ---- checkpoints -------------------------------------------------------------------

def _tensors(seed: float, n: int = 50_000):
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return {"adapter.a": torch.randn(n, generator=g), "optim.a.step": torch.ones(1) * seed}


def test_checkpoints_are_atomic_verified_and_never_unpickled(tmp_path, monkeypatch):
    import torch

    store = CheckpointStore(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        store.write(step, _tensors(step), {"step": step})
    assert [p.name for p in store.paths()] == ["ckpt-00000002.safetensors",
                                               "ckpt-00000003.safetensors"]
    # loading never unpickles: every unpickling path is booby-trapped
    def trap(*a, **k):
        raise AssertionError("a checkpoint load unpickled something")
    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "Unpickler", trap)
    monkeypatch.setattr(torch, "load", trap)
    tensors, info = store.load(store.latest())
    assert info == {"step": 3} and torch.equal(tensors["adapter.a"], _tensors(3)["adapter.a"])
    # a damaged newest file is detected; latest() falls back to the one before
    newest = store.paths()[-1]
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(WorkbenchError, match="corrupt"):
        store.load(newest)
    assert store.latest().name == "ckpt-00000002.safetensors"
    newest.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(WorkbenchError, match="cannot be read"):
        store.load(newest)
    # a pickle renamed to look like a checkpoint is refused, not run
    monkeypatch.undo()
    evil = store.folder / "ckpt-00000009.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    assert store.latest().name == "ckpt-00000002.safetensors"
    # what a killed writer leaves behind is never taken for a checkpoint, and is cleaned
    (store.folder / ".ckpt-00000010.safetensors.123.tmp").write_bytes(b"half")
    store.clean_partials()
    assert not list(store.folder.glob("*.tmp"))


def test_async_saves_copy_and_return_while_one_write_is_in_flight(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=10)
    ck = AsyncCheckpointer(store)
    big = _tensors(1, n=4_000_000)  # 16 MB: its write outlasts a copy
    stalls = [ck.save(step, big, {"step": step}) for step in range(1, 6)]
    ck.flush()
    ck.close()
    assert [int(p.name[5:13]) for p in store.paths()] == [1, 2, 3, 4, 5]
    for p in store.paths():
        store.load(p)
    assert stalls[0] < 1.0


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), where a second checkpoint does not fit."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_disk):
    store = CheckpointStore(tiny_disk / "ck", keep=5)
    ck = AsyncCheckpointer(store)
    ck.save(1, _tensors(1, n=150_000), {"step": 1})  # 600 kB: fits
    ck.flush()
    ck.save(2, _tensors(2, n=150_000), {"step": 2})  # does not fit beside the first
    with pytest.raises(WorkbenchError) as e:
        ck.flush()
    ck.close()
    assert "step 2 could not be written" in e.value.message
    assert "No space left on device" in e.value.message
    assert "ckpt-00000001.safetensors, is intact" in e.value.message
    assert [p.name for p in (tiny_disk / "ck").iterdir()] == ["ckpt-00000001.safetensors"]
    assert store.load(store.paths()[0])[1] == {"step": 1}


# ---- real runs -----------------------------------------------------------------------

def test_bad_requests_fail_before_any_training(tmp_path, default_model):
    data = small_data(tmp_path)
    with pytest.raises(WorkbenchError, match="QLoRA .* needs a CUDA GPU") as e:
        workbench.finetune(None, data, method="qlora", out=tmp_path / "q")
    assert "method='lora'" in e.value.hint
    with pytest.raises(WorkbenchError, match="method must be lora or qlora"):
        workbench.finetune(None, data, method="full", out=tmp_path / "q")
    with pytest.raises(WorkbenchError, match="cannot write to /proc"):
        workbench.finetune(None, data, out="/proc/workbench-finetune")
    with pytest.raises(WorkbenchError, match="no data"):
        workbench.finetune(None, None)
    busy = tmp_path / "busy"
    CheckpointStore(busy / "checkpoints").write(1, _tensors(1, 10), {"step": 1})
    with pytest.raises(WorkbenchError, match="checkpoints of an earlier run") as e:
        workbench.finetune(None, data, out=busy)
    assert "resume=True" in e.value.hint


def _tiny_gguf(path, architecture: str):
    """A one-tensor GGUF of `architecture`: enough for the header checks."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_base_model_transformers_cannot_load_is_named(tmp_path):
    path = _tiny_gguf(tmp_path / "odd.gguf", "rwkv7")
    job = workbench.finetune(path, small_data(tmp_path), out=tmp_path / "run")
    with pytest.raises(WorkbenchError, match="'rwkv7' architecture"):
        job.wait(timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run: 6 steps, a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("ft")
    job = workbench.finetune(None, small_data(tmp), out=tmp / "run", steps=6, ckpt_every=2,
                             keep=2, lr=1e-3, **FAST)
    events = []
    job.on_event(lambda kind, payload: events.append(kind))
    return job, job.wait(timeout=400), events, tmp


def test_a_run_trains_checkpoints_and_exports_a_lora_llama_cpp_loads(trained, default_model):
    job, result, events, tmp = trained
    assert result.steps == 6 and not result.cancelled
    assert result.val_loss_after < result.val_loss_before
    assert result.tokens_per_s > 0 and len(result.checkpoint_stalls_s) == 3
    assert [p.name for p in result.checkpoints] == ["ckpt-00000004.safetensors",
                                                    "ckpt-00000006.safetensors"]
    assert {"start", "step", "val", "checkpoint", "done"} <= set(events)
    # the thermal watch ran over it (no power reading on this machine: it says so)
    assert result.thermal["throttled"] is False and result.thermal["samples"] >= 2
    assert "CPU power" in result.thermal["missing"]
    assert len(job.history["train"]) == 6 and job.history["steps"][-1]["memory"] > 0
    # the adapter changes what the model says, in llama.cpp
    q = "Which magic frees the model's memory?"
    workbench.load_model(progress=False, n_ctx=1024)
    before = workbench.chat(q, system=SYSTEM, temperature=0, max_tokens=24).text
    info = workbench.load_model(progress=False, n_ctx=1024, lora=str(result.adapter))
    assert info.info.lora == str(result.adapter)
    after = workbench.chat(q, system=SYSTEM, temperature=0, max_tokens=24).text
    assert after != before
    # speculative decoding checks drafts with the adapter applied: it runs, and drafts
    spec = workbench.chat(q, system=SYSTEM, temperature=0, max_tokens=24, speculative="ngram")
    assert spec.metrics.speculative == "ngram" and spec.text.split()[:3] == after.split()[:3]
    # merged into a full model, it loads without --lora and says the same
    merged = workbench.merge_lora(None, result.adapter, out=tmp / "merged.F16.gguf",
                                  progress=False)
    workbench.load_model(merged, progress=False, n_ctx=1024)
    same = workbench.chat(q, system=SYSTEM, temperature=0, max_tokens=24).text
    assert same.split()[:3] == after.split()[:3]
    # merged and quantized in one call (the F16 step has a name of its own)
    from workbench.models.gguf_file import read_header

    q8 = workbench.merge_lora(None, result.adapter, to="int8", out=tmp / "merged.Q8_0.gguf",
                              progress=False)
    assert read_header(q8).quantization == "Q8_0" and not list(tmp.glob(".merged*"))
    workbench.load_model(progress=False, n_ctx=2048)


def test_the_dequantized_base_is_kept_for_the_next_run(trained, default_model):
    """transformers dequantizes a GGUF file in Python (some 30 s for the default model):
    the first run keeps the result, and later runs and distillations load it instead."""
    from workbench.models.hf import KEEP, cache_folder

    folder = cache_folder(default_model)
    assert (folder / "model-float32" / "complete").exists()
    assert (folder / "tokenizer" / "complete").exists()
    assert len(list(folder.parent.iterdir())) <= KEEP


def test_bad_lora_paths(default_model, tmp_path):
    with pytest.raises(WorkbenchError, match="no LoRA adapter at"):
        workbench.load_model(lora=str(tmp_path / "nope.gguf"), progress=False)
    with pytest.raises(WorkbenchError, match="is a model, not a LoRA adapter"):
        workbench.load_model(lora=str(default_model), progress=False)


def _wait_for(predicate, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("waited too long")
        time.sleep(0.05)


def test_kill_9_at_random_moments_then_resume(trained, tmp_path):
    """Killed three times at random steps; every checkpoint on disk stays whole, a resume
    loses at most one checkpoint interval, and the finished adapter equals the one an
    uninterrupted run of the same settings trained (optimizer state and data position
    restored)."""
    _, reference, _, tmp = trained
    data, out, rng = tmp / "small.jsonl", tmp_path / "run", random.Random(7)
    settings = dict(out=out, steps=6, ckpt_every=2, keep=2, lr=1e-3, **FAST)
    job = workbench.finetune(None, data, **settings)
    kills = 0
    for kill in range(3):
        if job.step >= 5:  # the resumed run got far before we looked
            break
        target = rng.randint(job.step + 1, 5)
        _wait_for(lambda: job.step >= target or job.done)
        if job.done:
            break
        kills += 1
        time.sleep(rng.random() * 1.5)  # anywhere in a step, or in a checkpoint write
        killed_at = job.step
        os.kill(job.pid, signal.SIGKILL)
        with pytest.raises(WorkbenchError, match="killed by SIGKILL") as e:
            job.wait(timeout=60)
        assert "resume=True" in e.value.hint or "run it again" in e.value.hint
        store = CheckpointStore(out / "checkpoints")
        for p in store.paths():  # nothing half-written under a final name
            store.load(p)
        newest = int(store.paths()[-1].name[5:13]) if store.paths() else 0
        assert newest >= killed_at - 2, (killed_at, newest)
        job = workbench.finetune(None, data, resume=True, **settings)
        _wait_for(lambda: job.total_steps or job.done)
        assert job.step == newest
    result = job.wait(timeout=400)
    assert result.steps == 6 and kills >= 1
    import torch

    ours = CheckpointStore(out / "checkpoints").load(result.checkpoints[-1])[0]
    theirs = CheckpointStore(reference.out_dir / "checkpoints").load(
        reference.checkpoints[-1])[0]
    for name, t in theirs.items():
        if name.startswith("adapter."):
            assert torch.allclose(ours[name], t, atol=1e-5), name


def test_the_magic_runs_and_reports_bad_lines(tmp_path, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', "{oops"])
    r = sh.run_cell(f"%finetune {bad} --out {tmp_path / 'r'}")
    assert not r.success and isinstance(r.error_in_exec, WorkbenchError)
    assert "line 2 of bad.jsonl" in r.error_in_exec.message
    r = sh.run_cell(f"%finetune {small_data(tmp_path)} --out {tmp_path / 'r'} --steps 1 "
                    "--batch-size 2 --max-len 96 --rank 2 --wait")
    assert r.success, r.error_in_exec
    assert r.result.steps == 1 and r.result.adapter.exists()
    r = sh.run_cell("%finetune --help")
    assert r.success and "--method" in capsys.readouterr().out


def test_the_live_widget_shows_the_run(trained):
    from workbench.dashboards.finetune import FinetuneDashboard

    job, result, _, _ = trained
    view = FinetuneDashboard(job)
    view.refresh()
    train, val = view.figure.data
    assert list(train.x) == [1, 2, 3, 4, 5, 6] and len(val.x) == 2  # before and after
    assert view.progress.value == view.progress.max == 6
    assert view.progress.bar_style == "success" and view.cancel_button.disabled
    assert "tokens/s" in view.stats.value and "MiB" in view.stats.value
    assert "ETA" in view.stats.value


def test_cancel_stops_checkpoints_and_exports_what_it_has(tmp_path):
    job = workbench.finetune(None, small_data(tmp_path), out=tmp_path / "run", steps=40,
                             ckpt_every=100, **FAST)
    with pytest.raises(WorkbenchError, match="still running after") as e:
        job.wait(timeout=0.01)
    assert "job.cancel()" in e.value.hint
    _wait_for(lambda: job.step >= 2 or job.done)
    job.cancel()
    result = job.wait(timeout=120)
    assert result.cancelled and 2 <= result.steps < 40 and job.status == "cancelled"
    assert result.adapter.exists()
    # the checkpoint written on cancel is where a resume would continue
    assert result.checkpoints[-1].name == f"ckpt-{result.steps:08d}.safetensors"


def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint(tiny_disk, tmp_path):
    # rank 2: a checkpoint (adapter and optimizer state) takes 7.3 MB; 10 MB hold one
    subprocess.run(["mount", "-o", "remount,size=10m", str(tiny_disk)], check=True)
    job = workbench.finetune(None, small_data(tmp_path), out=tiny_disk / "run", steps=4,
                             ckpt_every=1, **{**FAST, "rank": 2})
    with pytest.raises(WorkbenchError) as e:
        job.wait(timeout=300)
    assert "No space left on device" in e.value.message
    assert "ckpt-00000001.safetensors, is intact" in e.value.message
    store = CheckpointStore(tiny_disk / "run" / "checkpoints")
    assert [p.name for p in store.paths()] == ["ckpt-00000001.safetensors"]
    assert store.load(store.paths()[0])[1]["step"] == 1
    assert not list((tiny_disk / "run" / "checkpoints").glob(".*"))


def test_more_bad_data(tmp_path, default_model):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(WorkbenchError, match="not UTF-8"):
        read_data(tmp_path / "latin1.jsonl")
    for line, message in (('[1, 2]', "is a list, not an object"),
                          ('{"messages": "hi"}', "messages must be a non-empty list"),
                          ('{"messages": [{"role": "robot", "content": "x"}]}', "needs a role"),
                          ('{"prompt": 3, "completion": "x"}', "must both be strings"),
                          ('"   "', "is empty")):
        with pytest.raises(WorkbenchError, match=message) as e:
            read_data(write_jsonl(tmp_path / "one.jsonl", [line]))
        assert "line 1 of one.jsonl" in e.value.message and e.value.hint
    data = small_data(tmp_path)
    with pytest.raises(WorkbenchError, match="val_fraction must be between 0 and 1"):
        workbench.finetune(None, data, val_fraction=1.0, out=tmp_path / "v")
    with pytest.raises(WorkbenchError, match="device='cuda' needs a CUDA GPU"):
        workbench.finetune(None, data, device="cuda", out=tmp_path / "c")

    from workbench.finetune.data import tokenize
    from workbench.models.hf import load_tokenizer

    tok = load_tokenizer(default_model)
    with pytest.raises(WorkbenchError, match="no chat template"):
        tokenize(read_data(data), tok, None, "", "", 512, True)
    # in the training process: every reply cut away by max_len leaves nothing to learn
    job = workbench.finetune(None, data, out=tmp_path / "short", max_len=8, steps=1)
    with pytest.raises(WorkbenchError, match="no example is left") as e:
        job.wait(timeout=300)
    assert "max_len" in e.value.hint


def test_resuming_with_other_settings_is_refused(trained):
    _, result, _, tmp = trained
    job = workbench.finetune(None, tmp / "small.jsonl", out=result.out_dir, resume=True,
                             **{**FAST, "rank": 2}, steps=8)
    with pytest.raises(WorkbenchError, match="does not match this run's adapter") as e:
        job.wait(timeout=300)
    assert "same base model, rank" in e.value.hint


def test_a_lora_of_another_shape_and_an_unsupported_architecture(tmp_path, default_model):
    import gguf
    import numpy as np

    lora = tmp_path / "wrong.gguf"
    w = gguf.GGUFWriter(str(lora), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 100), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((576, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WorkbenchError, match="could not apply the LoRA") as e:
        workbench.load_model(lora=str(lora), progress=False, n_ctx=512)
    assert "trained on this base model" in e.value.hint
    workbench.load_model(progress=False, n_ctx=2048)

    odd = _tiny_gguf(tmp_path / "gemma.gguf", "gemma3")
    job = workbench.finetune(odd, small_data(tmp_path), out=tmp_path / "g")
    with pytest.raises(WorkbenchError, match="llama-architecture .* 'gemma3'"):
        job.wait(timeout=120)
