"""Device profile, GGUF inspector, placement planner, autotune and its database.

The CPU paths run for real: the default model in the worker, real memory measured.
A GPU cannot exist on CI, so the planner's GPU decisions are tested through its pure
function with explicit GPU budgets (the numbers a GPU would report)."""

from __future__ import annotations

import sqlite3
import warnings

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench.device.plan import PARTIAL_KV_GAIN, GiB, MiB, Budget, Overheads, place
from workbench.device.profile import DeviceProfile, usable_cores
from workbench.device.tuning_db import TuningDB
from workbench.errors import ModelFileError, WorkbenchError
from workbench.models import synthetic
from workbench.models.synthetic import LlamaShape
from workbench.models.inspect import inspect_model

from gguf_edit import truncated


# ---- inspector ---------------------------------------------------------------------

def test_inspector_matches_what_llama_cpp_allocates(default_model):
    m = inspect_model(default_model)
    assert (m.architecture, m.n_layers, m.n_ctx_train, m.n_vocab) == ("llama", 30, 8192, 49152)
    assert m.quantization == "Q4_1" and m.output_tied
    assert 134e6 < m.n_params < 136e6
    # 30 layers × 3 KV heads × 64 × (K + V) × 2 bytes
    assert m.kv_bytes_per_token("f16", "f16") == 30 * 3 * 64 * 2 * 2
    assert m.kv_bytes_per_token("q8_0", "q8_0") < m.kv_bytes_per_token() / 1.8
    info = workbench.load_model(default_model, progress=False, n_ctx=1024, kv_cache="off")
    buffers = {(b.device, b.kind): b.bytes for b in info.info.buffers}
    model_buf = sum(v for (d, k), v in buffers.items() if k == "model")
    assert abs(model_buf - m.weight_bytes) / m.weight_bytes < 0.01
    assert abs(buffers[("CPU", "KV")] - m.kv_bytes(1024)) <= MiB // 100
    assert info.kv_bytes_per_token == m.kv_bytes_per_token()
    assert "KiB/token" in repr(m) and "<table>" in m._repr_html_()


def test_dry_run_measures_the_compute_buffer_of_a_real_load(default_model):
    from workbench.config import LoadConfig

    cfg = LoadConfig(n_ctx=2048, n_ubatch=256, threads=2, max_threads=0, n_gpu_layers=0,
                     flash_attn="off", backend_sampling="off", kv_cache="off")
    dry = workbench.engine().measure_buffers(default_model, cfg)
    real = workbench.engine().load(default_model, cfg).buffers
    compute = [b.bytes for b in dry if b.kind == "compute"]
    assert compute and compute == [b.bytes for b in real if b.kind == "compute"]
    assert not any(b.kind in ("model", "KV") for b in dry)  # a dry run allocates nothing
    with pytest.raises(ModelFileError):
        workbench.engine().measure_buffers(default_model.with_name("missing.gguf"), cfg)


def test_inspector_bad_files(tmp_path, default_model):
    with pytest.raises(ModelFileError, match="not found"):
        inspect_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError):
        inspect_model(truncated(default_model, tmp_path / "cut.gguf", 4096))


# ---- planner on this machine (CPU) ------------------------------------------------------

def test_plan_on_the_cpu_explains_itself(default_model):
    p = workbench.plan(default_model)
    s = p.settings
    # the cores idle now (all of them on an idle machine), up to every usable core later
    assert s["n_gpu_layers"] == 0 and 1 <= s["threads"] <= usable_cores()
    assert s["max_threads"] == usable_cores()
    assert s["flash_attn"] == "off" and s["n_ctx"] == 4096 and s["type_k"] == "f16"
    text = repr(p)
    for word in ("threads", "n_ctx", "KV cache", "flash_attn", "memory CPU", "no GPU"):
        assert word in text, text
    assert "idle now" in text or "autotune" in text  # (an earlier test may have tuned it)
    assert "<table>" in p._repr_html_()


@pytest.mark.parametrize("settings", [
    {"n_ctx": 1024},
    {"n_ctx": 1024, "type_k": "q8_0", "type_v": "q8_0"},  # flash attention: slow to fill
    {"n_ctx": 2048, "flash_attn": "on", "n_ubatch": 256},
])
def test_predicted_memory_matches_the_measured_peak(default_model, settings):
    """Peak resident memory of a fresh worker that filled its whole context."""
    e = workbench.engine()
    e.close()  # a fresh worker: its peak is this configuration's alone
    p = workbench.plan(default_model, kv_cache="off", **settings)
    workbench.load_model(default_model, progress=False, kv_cache="off", **settings)
    n = p.settings["n_ctx"] - 8
    c = workbench.generate(list(range(1000, 1000 + n)), max_tokens=4, temperature=0)
    measured = c.metrics.peak_rss_bytes
    assert measured > 0
    err = p.predicted("CPU") / measured - 1
    assert abs(err) < 0.15, (settings, p.predicted("CPU") / MiB, measured / MiB)
    e.close()


def test_load_model_is_placed_by_the_planner(default_model):
    loaded = workbench.load_model(default_model, progress=False, n_ctx=2048)
    assert loaded.placement is not None
    assert loaded.threads == loaded.placement.settings["threads"] <= usable_cores()
    assert loaded.adapt_threads and loaded.n_gpu_layers == 0
    assert "placement" in repr(loaded)


def test_plan_shrinks_to_fit_a_small_budget(default_model):
    full = workbench.plan(default_model, kv_cache="off")
    assert full.settings["n_ubatch"] == 512 and full.settings["type_k"] == "f16"
    # first a smaller micro-batch (the compute buffer), with the f16 cache and the context kept
    p = workbench.plan(default_model, ram_mib=int(full.predicted("CPU") / MiB) - 40,
                       kv_cache="off")
    assert p.settings["n_ubatch"] < 512
    assert (p.settings["n_ctx"], p.settings["type_k"]) == (4096, "f16")
    assert "compute buffer fits" in repr(p)
    # then a quantized cache or a shorter context
    p = workbench.plan(default_model, ram_mib=230, kv_cache="off")
    assert p.settings["n_ctx"] < 4096 or p.settings["type_k"] != "f16"
    assert p.predicted("CPU") <= 230 * MiB
    assert "so the model fits" in repr(p) or "so that more fits" in repr(p)


def test_bad_placement_requests(default_model):
    with pytest.raises(WorkbenchError, match="GPU was asked for") as e:
        workbench.plan(default_model, device="gpu")
    assert "--device auto" in e.value.hint
    # with --device auto a GPU layer count falls back to the CPU, and says so
    p = workbench.plan(default_model, n_gpu_layers=99)
    assert p.settings["n_gpu_layers"] == 0 and "no GPU" in repr(p)
    with pytest.raises(WorkbenchError, match="needs a GPU"):
        workbench.plan(default_model, device="cpu", n_gpu_layers=4)
    with pytest.raises(WorkbenchError, match="trained for") as e:
        workbench.plan(default_model, n_ctx=100_000)
    assert "--n-ctx 8192" in e.value.hint
    with pytest.raises(WorkbenchError, match="threads"):
        workbench.plan(default_model, threads=0)
    with pytest.raises(WorkbenchError, match="device must be"):
        workbench.load_model(default_model, progress=False, device="tpu")
    with pytest.raises(WorkbenchError, match="fits nowhere") as e:
        workbench.plan(default_model, ram_mib=120)
    assert "GiB" in e.value.message and "needs" in e.value.message
    assert "quantization" in e.value.hint
    with pytest.raises(WorkbenchError, match="fits nowhere") as e:
        workbench.plan(default_model, ram_mib=300, n_ctx=8192, type_k="f16", type_v="f16")
    assert "--n-ctx" in e.value.hint and "q8_0" in e.value.hint


# ---- planner decisions with GPUs (explicit budgets: no GPU exists on CI) -------------

def _budgets(gpu_gib: float, n_gpus: int = 1, host_gib: float = 16) -> list[Budget]:
    host = Budget("CPU", "cpu", int(host_gib * GiB), int(host_gib * GiB), "test")
    return [host] + [Budget(f"CUDA{i}", "gpu", int(gpu_gib * GiB), int(gpu_gib * GiB), "test")
                     for i in range(n_gpus)]


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory, default_model):
    """The exact shape of llama-2-7B (Q4_0, random weights): about 3.6 GiB."""
    return inspect_model(synthetic("llama-2-7b", "q4_0",
                                   tmp_path_factory.mktemp("syn") / "llama-2-7b.gguf"))


def test_gpu_plans(seven_b):
    over = Overheads(host=300 * MiB, gpu=500 * MiB)
    full = place(seven_b, _budgets(80), cores=8, overheads=over)
    assert full.settings["n_gpu_layers"] == seven_b.n_layers + 1
    assert full.settings["flash_attn"] == "on" and full.settings["backend_sampling"] == "on"
    gpu = next(m for m in full.memory if m.device == "CUDA0")
    assert gpu.weights == seven_b.weight_bytes - seven_b.input_bytes  # embeddings stay on the CPU
    assert gpu.kv == 2 * GiB  # 4096 tokens × 512 KiB
    # capped below the model: a partial split, the most layers that fit
    part = place(seven_b, _budgets(3), cores=8, overheads=over)
    ngl = part.settings["n_gpu_layers"]
    assert 0 < ngl < seven_b.n_layers
    assert part.predicted("CUDA0") <= 3 * GiB
    # one layer more than fits, pinned by the user: the error names the GPU, not "nowhere"
    with pytest.raises(WorkbenchError, match=f"n_gpu_layers={ngl + 1} does not fit") as e:
        place(seven_b, _budgets(3), cores=8, overheads=over,
              fixed={k: part.settings[k] for k in ("type_k", "type_v", "n_ctx")}
              | {"n_gpu_layers": ngl + 1})
    assert "CUDA0" in e.value.message and "3.00 GiB usable" in e.value.message
    assert "--n-gpu-layers" in e.value.hint
    # a tight GPU takes a quantized KV cache before it gives up layers
    kvq = place(seven_b, _budgets(5.5), cores=8, overheads=over)
    assert kvq.settings["n_gpu_layers"] == seven_b.n_layers + 1
    assert kvq.settings["type_k"] in ("q8_0", "q4_0") and kvq.settings["flash_attn"] == "on"
    # two GPUs split in proportion to what each may use
    two = place(seven_b, [_budgets(2)[0], Budget("CUDA0", "gpu", 6 * GiB, 6 * GiB, ""),
                          Budget("CUDA1", "gpu", 3 * GiB, 3 * GiB, "")], cores=8, overheads=over)
    assert two.settings["tensor_split"] == (0.667, 0.333)
    assert two.predicted("CUDA0") > two.predicted("CUDA1") > 0
    # layers above the model's count are clamped, and the plan says so
    clamp = place(seven_b, _budgets(80), cores=8, overheads=over, fixed={"n_gpu_layers": 999})
    assert clamp.settings["n_gpu_layers"] == seven_b.n_layers + 1
    assert "999" in repr(clamp)


def test_partial_split_quantizes_the_kv_cache_only_for_enough_layers(seven_b):
    # With layers left on the CPU, a quantized KV cache slows them: it is taken only when
    # it moves at least PARTIAL_KV_GAIN of the CPU's layers to the GPU.
    over = Overheads(host=300 * MiB, gpu=500 * MiB)
    n = seven_b.n_layers
    seen = set()
    for gib in (1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0):
        chosen = place(seven_b, _budgets(gib), cores=8, overheads=over).settings
        f16 = place(seven_b, _budgets(gib), cores=8, overheads=over,
                    fixed={"type_k": "f16", "type_v": "f16"}).settings["n_gpu_layers"]
        q4 = place(seven_b, _budgets(gib), cores=8, overheads=over,
                   fixed={"type_k": "q4_0", "type_v": "q4_0"}).settings["n_gpu_layers"]
        assert f16 <= chosen["n_gpu_layers"] <= q4
        if chosen["type_k"] == "f16":
            assert q4 - f16 < PARTIAL_KV_GAIN * (n + 1 - f16) or q4 == f16
        else:
            assert chosen["n_gpu_layers"] - f16 >= PARTIAL_KV_GAIN * (n + 1 - f16)
        seen.add(chosen["type_k"] == "f16")
    assert seen == {True, False}  # both outcomes occur over these budgets


def test_gpu_plan_falls_back_to_the_cpu_and_fails_with_numbers(seven_b):
    over = Overheads(host=300 * MiB, gpu=500 * MiB)
    cpu = place(seven_b, _budgets(0.5), cores=8, overheads=over)
    assert cpu.settings["n_gpu_layers"] == 0
    with pytest.raises(WorkbenchError, match="fits nowhere") as e:
        place(seven_b, _budgets(0.5, host_gib=2), cores=8, overheads=over)
    assert "GiB" in e.value.message
    with pytest.raises(WorkbenchError, match="GPU was asked for"):
        place(seven_b, _budgets(1, n_gpus=0), device="gpu", cores=8, overheads=over)
    with pytest.raises(WorkbenchError, match="contradict") as e:
        place(seven_b, _budgets(80), device="cpu", fixed={"n_gpu_layers": 4}, cores=8,
              overheads=over)
    assert e.value.hint


# ---- autotune and its database -------------------------------------------------------

def test_tuning_database_survives_corruption(tmp_path):
    path = tmp_path / "tuning.sqlite"
    db = TuningDB(path)
    db.add("dev", "sha", "v", {"n_gpu_layers": 0, "threads": 2}, 100.0, 50.0)
    db.add("dev", "sha", "v", {"n_gpu_layers": 0, "threads": 1}, 60.0, 30.0)
    assert db.best("dev", "sha", "v")["threads"] == 2
    db.close()
    path.write_bytes(b"this is not a database" * 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = TuningDB(path)
    assert any("could not be read" in str(w.message) for w in caught)
    assert db.rebuilt_from is not None and db.rebuilt_from.exists()
    assert db.best("dev", "sha", "v") is None  # a new, empty database
    db.add("dev", "sha", "v", {"threads": 1}, 1.0, 1.0)
    db.close()
    assert sqlite3.connect(path).execute("select count(*) from runs").fetchone()[0] == 1


def test_the_latest_run_of_each_configuration_counts(tmp_path):
    """A quiet machine's old best does not outvote what was just measured on it busy."""
    db = TuningDB(tmp_path / "tuning.sqlite")
    try:
        db.add("dev", "sha", "v", {"n_gpu_layers": 0, "threads": 2}, 400.0, 150.0)  # quiet
        db.add("dev", "sha", "v", {"n_gpu_layers": 0, "threads": 1}, 200.0, 90.0)
        assert db.best("dev", "sha", "v")["threads"] == 2
        db.add("dev", "sha", "v", {"n_gpu_layers": 0, "threads": 1}, 190.0, 80.0)  # busy
        db.add("dev", "sha", "v", {"n_gpu_layers": 0, "threads": 2}, 60.0, 12.0)
        best = db.best("dev", "sha", "v")
        assert (best["threads"], best["tg_tps"]) == (1, 80.0)
    finally:
        db.close()


def test_the_plan_counts_idle_cores_not_cores(tmp_path, busy_core):
    # a model no autotune has measured: the idle cores alone decide
    never_tuned = synthetic("tiny", "q4_0", tmp_path / "tiny.gguf")
    p = workbench.plan(never_tuned, kv_cache="off")
    assert p.settings["threads"] == 1  # every usable core but one is busy elsewhere
    row = next(r for r in p.reasons if r[0] == "threads")
    assert "idle now" in row[2] and "re-chosen while decoding" in row[2]
    assert p.settings["max_threads"] == usable_cores()
    given = workbench.plan(never_tuned, threads=2)
    assert given.settings["threads"] == 2 and given.settings["max_threads"] == 0


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores")
def test_threads_follow_the_idle_cores_while_decoding(default_model, request):
    m = workbench.load_model(default_model, progress=False, n_ctx=1024, kv_cache="off")
    assert m.info.adapt_threads
    busy = request.getfixturevalue("busy_core")
    assert busy >= 1
    r = workbench.generate("Once upon a time", max_tokens=120, temperature=0,
                           ignore_eos=True)
    assert r.metrics.n_threads == 1, r.metrics  # the governor gave the busy core back
    fixed = workbench.load_model(default_model, progress=False, n_ctx=1024, kv_cache="off",
                                 threads=2)
    assert not fixed.info.adapt_threads
    r = workbench.generate("Once upon a time", max_tokens=40, temperature=0,
                           ignore_eos=True)
    assert r.metrics.n_threads == 2  # given: honored as given


def test_the_thread_governor_moves_with_the_load():
    """Its CPU readings come from a stand-in for the operating system's counters."""
    from workbench.worker.threads import CHECK_S, ThreadGovernor

    class Load:
        busy = 0.0

        def busy_elsewhere(self) -> float:
            return self.busy

    load, set_to = Load(), []
    g = ThreadGovernor(set_to.append, start=4, ceiling=4, meter=load)
    t = 0.0

    def decode(windows: int, rate: int) -> None:
        """Tokens at `rate` per second for `windows` checks (rates with exact 1/rate)."""
        nonlocal t
        for _ in range(int(windows * CHECK_S * rate)):
            t += 1 / rate
            g.tick(t)

    decode(2, 128)
    assert g.current == 4 and set_to == []
    load.busy = 2.0  # two cores taken by another process
    decode(1, 32)
    assert g.current == 2 and set_to == [2]
    decode(1, 32)
    load.busy = 0.1
    decode(1, 64)
    assert g.current == 4 and set_to == [2, 4]
    # slower with no load to explain it: one thread fewer is tried, kept only if faster
    decode(2, 128)
    decode(1, 16)
    assert g.current == 3
    decode(1, 8)  # not faster: back to 4, and no other probe for a while
    assert g.current == 4 and "not faster" in g.changes[-1][2]
    decode(1, 16)
    assert g.current == 4


def test_autotune_measures_stores_and_is_reused(default_model):
    r = workbench.autotune(default_model, threads=[1, 2], n_prompt=32, n_gen=8, repeats=1,
                           progress=False, n_ctx=1024)
    assert [(x["n_gpu_layers"], x["threads"]) for x in r.rows] == [(0, 1), (0, 2)]
    assert all(x["tg_tps"] > 0 and x["pp_tps"] > 0 for x in r.rows)
    assert r.best in r.rows and workbench.engine().model.threads == r.best["threads"]
    assert len(r.figure().data) == 1 and "<table>" in r._repr_html_()
    p = workbench.plan(default_model)
    # autotune's best, unless fewer cores are idle now than it used (then the reason says)
    assert p.settings["threads"] == r.best["threads"] or (
        p.settings["threads"] < r.best["threads"] and "idle now" in repr(p))
    assert p.settings["max_threads"] == r.best["threads"]
    assert "autotune" in repr(p)
    with pytest.raises(WorkbenchError, match="threads"):
        workbench.autotune(default_model, threads=[0], progress=False)
    with pytest.raises(WorkbenchError, match="do not fit"):
        workbench.autotune(default_model, n_gpu_layers=[4], progress=False)
    with pytest.raises(WorkbenchError, match="n_gen must be at least 1") as e:
        workbench.autotune(default_model, n_gen=0, progress=False)
    assert e.value.hint


def test_calibration_corrects_later_plans(default_model):
    before = workbench.plan(default_model, n_ctx=1024, kv_cache="off")
    report = workbench.calibrate(default_model, n_ctx=1024, progress=False)
    (target, predicted, measured, residual), = report.rows
    # the same plan (a fresh worker's own size differs by a few pages)
    assert target == "host" and abs(predicted - before.predicted("CPU")) < 2 * MiB
    assert measured > 0 and residual == measured - predicted
    assert "later plans add" in repr(report)
    after = workbench.plan(default_model, n_ctx=1024, kv_cache="off")
    assert after.overheads.host_correction == residual
    assert after.predicted("CPU") == predicted + residual
    assert "calibrated here" in repr(after)
    assert workbench.engine().model is not None  # the calibrated model stays loaded


# ---- profile -----------------------------------------------------------------------------

def test_profile_device_without_gpu(default_model):
    prof = workbench.profile_device(default_model)
    assert isinstance(prof, DeviceProfile)
    assert prof.usable_cores >= 1 and prof.ram_total > prof.ram_available > 0
    assert prof.mem_bandwidth_gbs > 0.5 and prof.disk_read_mbs > 1
    assert any(d.kind == "cpu" for d in prof.llama_devices)
    text = repr(prof)
    assert "GPU" in text and "none" in text and "memory bandwidth" in text
    assert len(prof.fingerprint) == 16


def test_live_device_monitor_samples_and_stops():
    mon = workbench.profile_device(live=True)
    try:
        s = mon.sample()
        assert 0 <= s["cpu_pct"] <= 100 and s["ram_used_gib"] > 0
        assert s["gpu_pct"] is None
        mon.refresh()
        assert len(mon.util.figure.data[0].x) >= 1
        assert mon.running
    finally:
        mon.stop()
    assert not mon.running and "stopped" in mon.header.value


def test_magics(capsys):
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell("%profile_device --quick")
    assert r.success and isinstance(r.result, DeviceProfile)
    r = sh.run_cell("%plan --n-ctx 2048")
    assert r.success and r.result.settings["n_ctx"] == 2048
    capsys.readouterr()
    r = sh.run_cell("%plan --device gpu")
    assert isinstance(r.error_in_exec, WorkbenchError)
    r = sh.run_cell("%profile_device --tune default --threads 1,x")
    assert isinstance(r.error_in_exec, WorkbenchError)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "Hint:" in out.out + out.err
    r = sh.run_cell("%load_model --device cpu --n-ctx 2048")
    assert r.success and r.result.n_gpu_layers == 0


# ---- synthetic models ---------------------------------------------------------------------

def test_quantized_synthetic_model_runs(tmp_path):
    p = synthetic("smollm2-135m", "q4_0", tmp_path / "s.gguf")
    m = inspect_model(p)
    assert m.quantization == "Q4_0" and m.n_layers == 30 and m.n_embd == 576
    assert not (tmp_path / "s.gguf.partial").exists()
    workbench.load_model(p, progress=False, n_ctx=512, kv_cache="off")
    c = workbench.generate("Hello", max_tokens=6, temperature=0, ignore_eos=True)
    assert c.metrics.generated_tokens == 6
    with pytest.raises(WorkbenchError, match="unknown quantization"):
        synthetic("tiny", "q3_k", tmp_path / "x.gguf")
    with pytest.raises(WorkbenchError, match="unknown model shape"):
        synthetic("gpt-9", "q4_0", tmp_path / "x.gguf")
    with pytest.raises(WorkbenchError, match="multiples of 32"):
        synthetic(LlamaShape(n_layer=1, n_embd=40, n_ff=128, n_head=4, n_head_kv=2), "q4_0",
                  tmp_path / "x.gguf")
    # a GGUF with no tokenizer cannot lend one
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "no-tokenizer.gguf"), "llama")
    w.add_tensor("t", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WorkbenchError, match="no tokenizer to copy") as e:
        synthetic("tiny", "q4_0", tmp_path / "x.gguf",
                  tokenizer_from=tmp_path / "no-tokenizer.gguf")
    assert "vocab-only" in e.value.hint
    assert not (tmp_path / "x.gguf").exists()
    workbench.load_model(progress=False, n_ctx=2048)


def test_the_engine_loads_only_a_resolved_configuration(default_model):
    """No default is decided below the planner: an open setting is a bug, named."""
    from workbench.config import LoadConfig
    from workbench.engine.client import Engine

    with pytest.raises(ValueError, match="threads, max_threads, flash_attn, backend_sampling"):
        Engine().load(default_model, LoadConfig(n_gpu_layers=0))
