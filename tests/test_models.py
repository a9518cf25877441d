"""The model catalog, discovery on disk, and fetching from a stand-in Hub on loopback
(HF_ENDPOINT points at tests/hub_server.py; no real hub is reachable here)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench.errors import WorkbenchError
from workbench.models.catalog import load_catalog, lookup, validate
from workbench.models.discover import discover, find_local, ollama_blob
from workbench.models.resolve import resolve

from hub_server import HubServer

REPO = "lab/tiny-GGUF"
FILE = "tiny.Q4_0.gguf"
MiB = 2 ** 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A real (small) GGUF: the tiny llama shape with random weights."""
    from workbench.models import synthetic

    return synthetic("tiny", "q4_0", tmp_path_factory.mktemp("tiny") / "tiny.Q4_0.gguf")


@pytest.fixture()
def places(tmp_path, monkeypatch):
    """Every place discovery and downloads look, inside tmp_path."""
    env = {"HF_HUB_CACHE": tmp_path / "hf", "OLLAMA_MODELS": tmp_path / "ollama",
           "LMSTUDIO_MODELS": tmp_path / "lmstudio", "WORKBENCH_MODELS": tmp_path / "project"}
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return env


@pytest.fixture()
def hub(places, monkeypatch, tmp_path):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _catalog(tmp_path: Path, monkeypatch, variants: list[dict]) -> Path:
    data = {"schema": 1, "models": [{
        "id": "tiny-test", "name": "Tiny test model", "family": "tiny", "params": None,
        "architecture": "llama", "license": None, "context_length": 512, "shape": None,
        "variants": variants, "source": "tests/test_models.py"}]}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("WORKBENCH_CATALOG", str(path))
    return path


def _variant(data: bytes, **over) -> dict:
    return {"quant": "Q4_0", "repo": REPO, "file": FILE, "revision": None, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **over}


# ---- the catalog file ------------------------------------------------------------------

def test_packaged_catalog_is_valid_and_the_cli_checks_it(tmp_path):
    entries = load_catalog()
    assert entries and all(e.variants for e in entries)
    default = lookup("smollm2-135m-instruct:q4_1")[1]
    assert default.sha256 and default.size == 98362432 and default.revision
    assert lookup("tinyllama-1.1b-chat-v1.0")[1].quant == "Q4_K_M"  # the default pick
    cli = [sys.executable, "-m", "workbench.cli", "catalog", "validate"]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": 1, "models": [{"id": "x", "variants": []}]}))
    no = subprocess.run(cli + [str(bad)], capture_output=True, text=True)
    assert no.returncode == 1 and "variants must be a non-empty list" in no.stdout


def test_validate_names_each_problem():
    good = json.loads((Path(workbench.__file__).parent / "models" / "catalog.json").read_text())
    assert validate(good) == []
    m = good["models"][0]
    bad = {"schema": 1, "models": [
        m, dict(m),  # the same id twice
        {**m, "id": "Bad Id", "params": -3, "variants": [
            {**m["variants"][0], "quant": "Q9_9", "repo": "no-slash",
             "file": "../escape.gguf", "sha256": "abc", "revision": "main"}]}]}
    problems = "\n".join(validate(bad))
    for expected in ("id is not unique", "id must be lowercase", "params must be",
                     "quant must be one of", "repo must be 'owner/name'",
                     "file must be a relative .gguf path", "sha256 must be 64",
                     "revision must be a 40-hex"):
        assert expected in problems, expected


def test_unknown_id_suggests_the_closest(places):
    with pytest.raises(WorkbenchError) as e:
        workbench.load_model("smollm2-135m-instrct", progress=False)
    assert "no model called" in e.value.message
    assert "smollm2-135m-instruct" in e.value.hint
    with pytest.raises(WorkbenchError, match="has no q5_k_m variant") as e:
        resolve("smollm2-135m-instruct:q5_k_m")
    assert "Q4_1" in e.value.hint


def test_the_catalog_id_of_the_bundled_model_needs_no_download(places, default_model):
    assert resolve("smollm2-135m-instruct") == default_model
    assert resolve("smollm2-135m-instruct:q4_1") == default_model


# ---- discovery -------------------------------------------------------------------------

def _fake_places(env: dict, tiny: Path) -> dict:
    data = tiny.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    # Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<sha256>
    repo = env["HF_HUB_CACHE"] / "models--lab--tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).write_bytes(data)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / FILE).symlink_to(Path("../../blobs") / sha)
    # Ollama: a manifest naming a sha256 blob
    ol = env["OLLAMA_MODELS"]
    (ol / "blobs").mkdir(parents=True)
    (ol / "blobs" / f"sha256-{sha}").write_bytes(data)
    man = ol / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    man.mkdir(parents=True)
    (man / "latest").write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{sha}",
         "size": len(data)}]}))
    # LM Studio: publisher/repo/file
    lm = env["LMSTUDIO_MODELS"] / "lab" / "tiny-GGUF"
    lm.mkdir(parents=True)
    (lm / "tiny-lmstudio.Q4_0.gguf").write_bytes(data)
    # the project's folder
    env["WORKBENCH_MODELS"].mkdir()
    (env["WORKBENCH_MODELS"] / "mine.gguf").write_bytes(data)
    return {"sha": sha, "ollama_manifest": man / "latest"}


def test_discovery_finds_models_in_all_four_places(places, tiny):
    _fake_places(places, tiny)
    found = {m.source: m for m in discover()}
    assert set(found) == {"huggingface", "ollama", "lmstudio", "project"}
    for m in found.values():
        assert m.architecture == "llama" and m.quantization == "Q4_0" and not m.problem
        assert m.size == tiny.stat().st_size
    hf = found["huggingface"]
    assert hf.repo == REPO and hf.revision == "a" * 40 and hf.file == FILE
    assert found["ollama"].name == "ollama:tiny:latest"
    assert found["lmstudio"].name == "lab/tiny-GGUF/tiny-lmstudio.Q4_0.gguf"
    # names resolve to the files; a bare file name works when it is unique
    assert find_local("ollama:tiny:latest").path.name.startswith("sha256-")
    assert find_local("mine").path == places["WORKBENCH_MODELS"] / "mine.gguf"
    (places["WORKBENCH_MODELS"] / FILE).write_bytes(tiny.read_bytes())
    with pytest.raises(WorkbenchError, match="names 2 local models") as e:
        find_local(FILE.removesuffix(".gguf"))  # the HF cache's copy and the project's
    assert f"{REPO}/{FILE}" in e.value.hint


def test_discovered_models_load_by_name_through_the_magic(places, tiny):
    _fake_places(places, tiny)
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell("%models --local")
    assert r.success, r.error_in_exec
    names = [row.name for row in r.result.rows]
    assert "ollama:tiny:latest" in names and "mine.gguf" in names
    r = sh.run_cell("%load_model ollama:tiny:latest --n-ctx 256")
    assert r.success, r.error_in_exec
    assert r.result.architecture == "llama"
    c = workbench.generate("hello", max_tokens=3, temperature=0, ignore_eos=True)
    assert c.metrics.generated_tokens == 3


def test_names_that_reach_outside_are_refused(places, tiny, tmp_path):
    paths = _fake_places(places, tiny)
    for name in ("ollama:../../etc", "tiny-test:../q4_0", "smollm2..x", "lab/../mine"):
        with pytest.raises(WorkbenchError, match="may not contain '..'"):
            resolve(name)
    # a link in LM Studio's folder to a file elsewhere is listed with the reason, not loaded
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(tiny.read_bytes())
    (places["LMSTUDIO_MODELS"] / "lab" / "escape.gguf").symlink_to(outside)
    esc = next(m for m in discover() if m.path.name == "escape.gguf")
    assert "links outside" in esc.problem
    with pytest.raises(WorkbenchError, match="links outside"):
        resolve("lab/escape.gguf")
    # an Ollama manifest whose digest is not a sha256 (CVE-2024-37032's path traversal)
    paths["ollama_manifest"].write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model",
         "digest": "sha256:../../../../etc/passwd"}]}))
    with pytest.raises(WorkbenchError, match="not a sha256 digest: refused"):
        ollama_blob(places["OLLAMA_MODELS"], paths["ollama_manifest"])
    listed = next(m for m in discover() if m.name == "ollama:tiny:latest")
    assert "refused" in listed.problem
    with pytest.raises(WorkbenchError, match="refused"):
        resolve("ollama:tiny:latest")


# ---- fetching from the stand-in Hub ----------------------------------------------------

def test_fetch_resumes_after_a_dropped_connection_and_verifies(hub, tmp_path, monkeypatch):
    data = os.urandom(24 * MiB)  # over huggingface_hub's 10 MiB chunk, so a chunk lands first
    hub.hub.publish(REPO, {FILE: data})
    _catalog(tmp_path, monkeypatch, [_variant(data)])
    hub.hub.drop_after = 15 * MiB
    seen: list[float] = []
    path = resolve("tiny-test:q4_0", progress=seen.append)
    assert path.read_bytes() == data
    assert hub.hub.gets[0] == "-" and hub.hub.gets[1].startswith("bytes=")  # resumed
    assert int(hub.hub.gets[1][6:].split("-")[0]) >= 10 * MiB
    assert seen and seen[-1] == 1.0
    # the second time it is on disk, verified, and nothing is downloaded
    n = len(hub.hub.gets)
    assert resolve("tiny-test") == path and len(hub.hub.gets) == n


def test_fetch_rejects_a_wrong_sha256_and_removes_the_file(hub, tmp_path, monkeypatch):
    data = os.urandom(MiB)
    hub.hub.publish(REPO, {FILE: data})
    # the Hub's file is not the one the catalog checked: refused before any byte comes
    _catalog(tmp_path, monkeypatch, [_variant(data, sha256="0" * 64)])
    with pytest.raises(WorkbenchError, match="nothing was downloaded") as e:
        resolve("tiny-test")
    assert "catalog entry needs updating" in e.value.hint and hub.hub.gets == []
    # bytes damaged in transit (same size, same etag announced): caught by the sha256
    _catalog(tmp_path, monkeypatch, [_variant(data)])
    hub.hub.damaged[FILE] = os.urandom(MiB)
    with pytest.raises(WorkbenchError, match="failed verification") as e:
        resolve("tiny-test")
    assert "removed" in e.value.message
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not any(p.is_file() for p in cache.rglob(FILE))
    assert not any(p.is_file() for p in cache.rglob("blobs/*"))
    # the next try, undamaged, succeeds
    del hub.hub.damaged[FILE]
    assert resolve("tiny-test").read_bytes() == data


def test_fetch_reports_a_404_clearly(hub, tmp_path, monkeypatch):
    hub.hub.publish(REPO, {"other.gguf": b"x"})
    _catalog(tmp_path, monkeypatch, [_variant(b"x")])
    with pytest.raises(WorkbenchError, match="no such file on the Hub \\(404\\)"):
        resolve("tiny-test")
    _catalog(tmp_path, monkeypatch, [_variant(b"x", repo="lab/missing")])
    with pytest.raises(WorkbenchError, match="no such repository on the Hub \\(404\\)"):
        resolve("tiny-test")


def test_offline_uses_the_cache_and_says_so_when_it_cannot(hub, tmp_path, monkeypatch):
    data = os.urandom(MiB)
    hub.hub.publish(REPO, {FILE: data})
    _catalog(tmp_path, monkeypatch, [_variant(data)])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="HF_HUB_OFFLINE is set"):
        resolve("tiny-test")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = resolve("tiny-test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.hub.gets)
    assert resolve("tiny-test") == path and len(hub.hub.gets) == n


def test_updates_are_detected_and_applied_verified(hub, tmp_path, monkeypatch, tiny):
    old = tiny.read_bytes()
    first = hub.hub.publish(REPO, {FILE: old})
    _catalog(tmp_path, monkeypatch, [_variant(old)])
    old_path = resolve("tiny-test")
    assert len(workbench.check_updates()) == 0
    new = bytearray(old)
    new[-1] ^= 0xFF  # the last weight byte: still a valid GGUF of the same size
    second = hub.hub.publish(REPO, {FILE: bytes(new)})
    ups = workbench.check_updates()
    assert len(ups) == 1
    changed = "; ".join(ups.updates[0].changed)
    assert f"{first[:10]} → {second[:10]}" in changed and "contents changed" in changed
    assert "lab/tiny-GGUF" in repr(ups)
    new_path = workbench.update_model(f"{REPO}/{FILE}", progress=False)
    assert new_path.read_bytes() == bytes(new) and second in str(new_path)
    assert old_path.read_bytes() == old  # the old file stays in its snapshot
    assert len(workbench.check_updates()) == 0  # the newest snapshot is now local
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell("%models --updates")
    assert r.success and "up to date" in repr(r.result)


def test_a_full_disk_mid_download_leaves_no_partial_file(hub, tmp_path):
    data = os.urandom(24 * MiB)
    hub.hub.publish(REPO, {FILE: data})
    cat = tmp_path / "cat.json"
    cat.write_text(json.dumps({"schema": 1, "models": [{
        "id": "tiny-test", "name": "t", "family": "tiny", "params": None,
        "architecture": None, "license": None, "context_length": None, "shape": None,
        "variants": [_variant(data)], "source": "test"}]}))
    # The child may write at most 12 MiB to any file: the kernel fails the next write
    # with EFBIG, as a full disk fails it with ENOSPC.
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (12 << 20, 12 << 20))\n"
            "from workbench.models.resolve import resolve\n"
            "from workbench.errors import WorkbenchError\n"
            "try:\n    resolve('tiny-test')\nexcept WorkbenchError as e:\n"
            "    print('ERROR', e.message)\n")
    env = {**os.environ, "WORKBENCH_CATALOG": str(cat)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "ERROR the disk filled up" in out.stdout, out.stdout + out.stderr
    assert "partial file was removed" in out.stdout
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 0
                and "blobs" in p.parts], list(cache.rglob("*"))


def test_models_table_shows_what_fits(places, default_model):
    from workbench.device.profile import fingerprint
    from workbench.device.tuning_db import TuningDB
    from workbench.models.hashing import file_sha256

    tuned = workbench.autotune(threads=[2], n_prompt=16, n_gen=4, repeats=1, progress=False,
                               n_ctx=512)
    t = workbench.list_models(fits=True)
    row = next(r for r in t.rows if r.name == "smollm2-135m-instruct:q4_1")
    assert row.where == str(default_model)
    assert row.fits.startswith("yes: CPU") and "(estimate)" not in row.fits
    # the fastest decoding measured here: this autotune's, or a faster run other tests stored
    db = TuningDB()
    try:
        stored = db.best(fingerprint(), file_sha256(default_model),
                         workbench.engine().worker.llama_cpp_version)
    finally:
        db.close()
    assert stored["tg_tps"] >= tuned.best["tg_tps"]
    assert row.tokens_per_s == pytest.approx(stored["tg_tps"])
    # a catalog variant not on this machine: the planner on the catalog's shape and size
    q4km = next(r for r in t.rows if r.name == "smollm2-135m-instruct:q4_k_m")
    assert q4km.where == "catalog" and q4km.fits.endswith("(estimate)")
    # no shape: the weights alone against the memory there is
    gemma = next(r for r in t.rows if r.name == "gemma-3-270m-it:q8_0")
    assert gemma.fits.startswith("the weights (0.27 GiB) fit")
    assert "smollm2-135m-instruct:q4_1" in repr(t) and "<table>" in t._repr_html_()
    only = workbench.list_models(family="no-such-family")
    assert len(only) == 0


def test_load_model_fetches_a_catalog_id_verifies_and_loads(hub, tmp_path, monkeypatch, tiny):
    data = tiny.read_bytes()
    hub.hub.publish(REPO, {FILE: data})
    _catalog(tmp_path, monkeypatch, [_variant(data)])
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell("%load_model tiny-test:q4_0 --n-ctx 256")
    assert r.success, r.error_in_exec
    assert r.result.architecture == "llama" and r.result.name == FILE
    assert hub.hub.gets == ["-"]  # one download
    c = workbench.generate("hi", max_tokens=2, temperature=0, ignore_eos=True)
    assert c.metrics.generated_tokens == 2
    # the listing shows it as on this machine now
    t = workbench.list_models(family="tiny")
    assert [row.where != "catalog" for row in t.rows] == [True]


def test_malformed_inputs_are_reported_not_raised(places, tiny):
    paths = _fake_places(places, tiny)
    # a manifest whose layers are not objects
    paths["ollama_manifest"].write_text(json.dumps({"layers": ["x"]}))
    row = next(m for m in discover() if m.name == "ollama:tiny:latest")
    assert "not an Ollama model manifest" in row.problem
    # catalog values of the wrong type, and missing keys
    m = {"id": ["x"], "name": "n", "family": "f", "source": "s",
         "variants": [{"quant": ["Q4_0"], "repo": "a/b", "file": "f.gguf"}]}
    problems = "\n".join(validate({"schema": 1, "models": [m]}))
    assert "id must be a string" in problems and "quant must be one of" in problems
    assert "missing keys" in problems and "write null for unknown" in problems


def test_hub_cache_files_in_the_shared_xet_store(places, tiny):
    """huggingface_hub keeps Xet-stored files in a store shared by all repositories:
    snapshots/<rev>/<file> -> blobs/<etag> -> <cache>/blobs/<xx>/<xet hash>."""
    from workbench.models.fetch import _discard, blob_sha

    data = tiny.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    cache = places["HF_HUB_CACHE"]
    store = cache / "blobs" / "ab" / ("ab" + "c" * 62)
    store.parent.mkdir(parents=True)
    store.write_bytes(data)
    repo = cache / "models--lab--tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).symlink_to(Path("../../blobs/ab") / store.name)
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / FILE).symlink_to(Path("../../blobs") / sha)
    found = [m for m in discover() if m.source == "huggingface"]
    assert [m.name for m in found] == [f"{REPO}/{FILE}"] and not found[0].problem
    assert blob_sha(found[0].path) == sha  # the etag, not the Xet hash
    _discard(found[0].path)
    assert not (snap / FILE).exists() and not (repo / "blobs" / sha).is_symlink()
    assert store.read_bytes() == data  # other repositories may use the store's file


def test_a_cached_copy_that_differs_is_passed_over(hub, tmp_path, monkeypatch):
    data = os.urandom(MiB)
    hub.hub.publish(REPO, {FILE: data})
    _catalog(tmp_path, monkeypatch, [_variant(data)])
    stale = Path(os.environ["HF_HUB_CACHE"]) / "models--lab--tiny-GGUF" / "snapshots" / ("c" * 40)
    stale.mkdir(parents=True)
    (stale / FILE).write_bytes(b"an older file of the same name")
    path = resolve("tiny-test")
    assert path.read_bytes() == data and hub.hub.gets == ["-"]
    assert (stale / FILE).exists()  # left alone: it is another revision's file


def test_after_an_update_the_name_loads_the_new_revision(hub, tmp_path, monkeypatch, tiny):
    old = tiny.read_bytes()
    hub.hub.publish(REPO, {FILE: old})
    _catalog(tmp_path, monkeypatch, [_variant(old)])
    resolve("tiny-test")
    new = bytearray(old)
    new[-1] ^= 0xFF
    second = hub.hub.publish(REPO, {FILE: bytes(new)})
    workbench.update_model(f"{REPO}/{FILE}", progress=False)
    assert resolve(f"{REPO}/{FILE}").read_bytes() == bytes(new)
    names = sorted(m.name for m in discover() if m.source == "huggingface")
    assert names[0] == f"{REPO}/{FILE}" and names[1].startswith(f"{REPO}/{FILE}@")
    assert second in str(resolve(f"{REPO}/{FILE}").parent)
    # a repository the Hub no longer has: its row says so, the others are still checked
    hub.hub.branches.pop(REPO)
    ups = workbench.check_updates()
    assert "not checked" in repr(ups) and "no such repository" in repr(ups)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="HF_HUB_OFFLINE is set"):
        workbench.check_updates()


def test_an_unreachable_hub_and_a_model_not_from_it(places, tmp_path, monkeypatch, tiny):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    _catalog(tmp_path, monkeypatch, [_variant(b"x")])
    with pytest.raises(WorkbenchError, match="cannot reach the Hub") as e:
        resolve("tiny-test")
    assert "HF_HUB_OFFLINE" in e.value.hint
    _fake_places(places, tiny)
    with pytest.raises(WorkbenchError, match="not a model from the Hugging Face cache") as e:
        workbench.update_model("ollama:tiny:latest", progress=False)
    assert "--updates" in e.value.hint
