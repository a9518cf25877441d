"""Task accuracy through the engine: the worker's exact log-likelihoods, lm-eval's model
"workbench" on the offline tasks, %eval and `workbench eval`, agreement with
transformers, and every bad input the loaded model must survive."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench.errors import WorkbenchError
from workbench.evaluation.tasks import DATA, read_docs

Q = "Question: What is the capital of Albania?\nAnswer:"


def test_scores_are_exact_sums_and_shared_contexts_change_nothing(loaded):
    pairs = [(Q, " Bamako"), (Q, " Bern"), (Q, " Tirana"), ("The cat sat on the", " mat")]
    together = loaded.score(pairs)
    for pair, lp, toks in zip(pairs, together.logprobs, together.tokens):
        alone = loaded.score([pair])
        assert alone.logprobs[0] == pytest.approx(lp, abs=1e-6)
        assert len(lp) == len(toks) >= 1 and all(x <= 0 for x in lp)
    # the question is decoded once for its three choices
    one = loaded.score([pairs[0]]).decoded
    assert together.decoded < 3 * one
    # the log-probabilities are the model's: the greedy token of a prompt scores highest
    text = workbench.generate("The capital of France is", max_tokens=1, temperature=0).text
    best = loaded.score([("The capital of France is", text)])
    assert best.greedy[0] and best.logprobs[0][0] > loaded.score(
        [("The capital of France is", " cheese")]).logprobs[0][0]
    # a rolling text across several windows of the context: every token scored once
    long = "one two three four five six seven eight nine ten " * 300
    rolled = loaded.score([(long, "")], rolling=True)
    assert len(rolled.tokens[0]) > 2048 and all(math.isfinite(x) for x in rolled.logprobs[0])


def test_simple_evaluate_finds_the_workbench_model(default_model, tmp_path):
    """lm_eval.simple_evaluate(model="workbench", model_args="model=PATH,...") in a fresh
    interpreter: the name is registered by `import workbench`."""
    code = f"""
import json, lm_eval, workbench
from workbench.evaluation.tasks import local_task
r = lm_eval.simple_evaluate(model="workbench", model_args="model={default_model},threads=2,n_ctx=1024",
                            tasks=[local_task("wb_capitals")], limit=12, bootstrap_iters=0,
                            log_samples=False)
print("RESULT", json.dumps(r["results"]["wb_capitals"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                           "HF_DATASETS_OFFLINE": "1"})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    res = json.loads(line[0][7:])
    assert res["sample_len"] == 12 and 0.25 < res["acc,none"] <= 1.0


def test_eval_tasks_on_the_three_local_tasks(loaded, tmp_path):
    r = workbench.eval_tasks(tasks="wb_capitals,wb_docstrings,wb_pasttense", limit=24,
                             output=tmp_path / "r.json", progress=False)
    assert {s.task for s in r.scores} == {"wb_capitals", "wb_docstrings", "wb_pasttense"}
    acc = r.score("wb_capitals", "acc")
    assert acc.n == 24 and acc.low <= acc.value <= acc.high and acc.value > 0.4
    assert 0 <= r.score("wb_pasttense", "exact_match").value <= 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["results"]["wb_capitals"]["acc,none"] == acc.value
    prov = data["workbench"]
    assert len(prov["model"]["sha256"]) == 64 and prov["versions"]["lm_eval"]
    assert prov["tasks"]["wb_capitals"]["sha256"] and prov["machine"]["cores_logical"]
    assert "95% interval" in r._repr_html_()
    assert loaded.model is not None  # the notebook's model stays loaded


def test_eval_magic_and_bad_inputs_keep_the_model(loaded, tmp_path, capsys):
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell(f"%eval --tasks wb_capitals --limit 8 --output {tmp_path}/m.json")
    assert r.success, r.error_in_exec
    assert r.result.score("wb_capitals", "acc").n == 8 and (tmp_path / "m.json").exists()
    bad = tmp_path / "bad.jsonl"
    cases = {
        "--tasks no_such_task_anywhere": "unknown task 'no_such_task_anywhere'",
        f"--tasks {tmp_path}/missing.jsonl": "does not exist",
        "--limit 0": "limit must be",
        "--tasks ''": "no task given",
    }
    for line, needle in cases.items():
        capsys.readouterr()
        r = sh.run_cell(f"%eval {line}")
        assert isinstance(r.error_in_exec, WorkbenchError), (line, r.error_in_exec)
        text = "".join(capsys.readouterr())
        assert needle in text and "Traceback" not in text, (line, text)
    # task files: a malformed document, an empty choice list, an answer out of range
    files = {
        '{"question": "Q?", "choices": ["a", "b"], "answer": 0}\n{"question": "Q?", "choi':
            "line 2 of bad.jsonl is not valid JSON",
        '{"question": "Q?", "choices": [], "answer": 0}': "empty choice list",
        '{"question": "Q?", "choices": ["a", "b"], "answer": 2}': "not the index of a choice",
        '{"question": "Q?", "choices": ["a", "b"], "answer": 0}\n{"context": "c", "target": "t"}':
            "line 2 of bad.jsonl lacks",
        '["a list"]': "not an object",
        '{"prompt": "p", "answer": ""}': "answer must be non-empty",
    }
    for text, needle in files.items():
        bad.write_text(text)
        with pytest.raises(WorkbenchError, match=needle):
            workbench.eval_tasks(tasks=str(bad), progress=False, output=tmp_path / "x.json")
    # a continuation longer than the context, an empty one, a pair that is not a pair
    with pytest.raises(WorkbenchError, match="longer than the context window"):
        loaded.score([("Hi", " word" * 2100)])
    with pytest.raises(WorkbenchError, match="has no tokens"):
        loaded.score([("Hi", "")])
    with pytest.raises(WorkbenchError, match="not \\(context, continuation\\)"):
        loaded.score([("only one",)])
    with pytest.raises(WorkbenchError, match="outside the vocabulary"):
        loaded.score([((1, 2), (10**7,))])
    # an lm-eval generation option the engine has no counterpart for is refused by name
    from workbench.evaluation.lm import generation_params

    with pytest.raises(WorkbenchError, match="num_beams"):
        generation_params({"until": ["\n"], "num_beams": 4})
    from workbench.evaluation.lm import WorkbenchLM

    with pytest.raises(WorkbenchError, match="got device"):  # it would be ignored
        WorkbenchLM(session=workbench.api.session(), device="cuda")
    # after all of it, the same model answers
    assert loaded.model is not None
    assert workbench.generate("1, 2, 3,", max_tokens=4, temperature=0).text.strip()


def test_a_task_file_of_ones_own(loaded, tmp_path):
    f = tmp_path / "quiz.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"What is {a} plus {a}?",
                                       "choices": [str(2 * a), str(2 * a + 1)], "answer": 0})
                           for a in range(1, 7)))
    r = workbench.eval_tasks(tasks=str(f), output=tmp_path / "q.json", progress=False)
    assert r.score("quiz", "acc").n == 6


def test_cli_eval(default_model, tmp_path):
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "eval", str(default_model),
                          "--tasks", "wb_capitals", "--limit", "6", "--threads", "2",
                          "--n-ctx", "1024", "--output", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wb_capitals" in out.stdout and (tmp_path / "c.json").exists()
    bad = subprocess.run([sys.executable, "-m", "workbench.cli", "eval", "--tasks", "nope_x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "unknown task" in bad.stderr and "Traceback" not in bad.stderr


def test_log_likelihoods_agree_with_transformers(loaded, default_model):
    """The same token ids through transformers (the GGUF dequantized to float32): the
    Q4_1 file differs by llama.cpp's 8-bit activation rounding, within 1.5 nats on a
    token and 0.3 on average; the greedy verdicts agree."""
    from workbench.evaluation.reference import agreement, hf_tokens

    docs, _ = read_docs(DATA / "capitals.jsonl")
    pairs = [(f"Question: {d['question']}\nAnswer:", " " + c) for d in docs[:6]
             for c in d["choices"]]
    a = agreement(loaded, default_model, hf_tokens(default_model, pairs), threads=2)
    assert a.tokens >= 24 and a.max_abs_diff < 1.5 and a.mean_abs_diff < 0.3
    assert a.same_greedy >= 0.9


def test_quality_target_refuses_bad_targets_before_any_work(loaded, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    cases = [({"min_top1": 1.5}, r"--min-top1 1.5 is not a share in \(0, 1\]"),
             ({"min_top1": 0}, "not a share"), ({"max_kl": -1.0}, "not a positive number"),
             ({"max_kl": float("nan")}, "not a positive number"),
             ({"max_size": 1.2}, "bounds a quality target"),
             ({"min_top1": 0.9, "max_size": 0}, "not a positive multiple"),
             ({"min_top1": 0.9, "overrides": {"token_embd": "F16"}}, "chooses the tensor types"),
             ({"min_top1": 0.9, "to": "F16"}, "no quantized tensors"),
             ({"min_top1": 0.9, "check_tokens": 10}, "fewer than one chunk")]
    for kw, needle in cases:
        kw = {"to": "int8", **kw}
        with pytest.raises(WorkbenchError, match=needle):
            workbench.quantize(out=out, progress=False, **kw)
        assert not out.exists()
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    capsys.readouterr()
    r = sh.run_cell(f"%quantize --to int8 --min-top1 1.5 --out {out}")
    assert isinstance(r.error_in_exec, WorkbenchError)
    text = "".join(capsys.readouterr())
    assert "--min-top1 1.5" in text and "Traceback" not in text
    assert workbench.generate("1, 2, 3,", max_tokens=3, temperature=0).text.strip()


def test_quality_target_met_and_unreachable(loaded, tmp_path):
    """A target the kept tensors already meet: no search, checked on held-out text. A
    target no mix within the size limit reaches: the error names the best found."""
    held = workbench.quantize(to="int8", min_top1=0.9, out=tmp_path / "held.gguf",
                              check_tokens=1020, threads=2, progress=False)
    assert held.path.exists() and held.top1 >= 0.9 and held.tokens == 1020
    assert held.bytes < held.uniform_bytes  # the source's Q4_1 tensors are kept as they are
    assert "Q4_1" in held.overrides.values() and held.promoted == ()
    assert "held-out text: top-1" in repr(held)
    with pytest.raises(WorkbenchError, match=r"no mix within 0.75x uniform Q8_0's size reaches "
                                             r"the target; the best found") as e:
        workbench.quantize(to="int8", min_top1=0.999, max_size=0.75,
                           out=tmp_path / "never.gguf", threads=2, progress=False)
    assert "top-1" in e.value.message and not (tmp_path / "never.gguf").exists()
    assert not list(tmp_path.glob(".wb-target-*"))  # the search's files are gone
    assert workbench.generate("1, 2, 3,", max_tokens=3, temperature=0).text.strip()


def test_eval_on_a_busy_machine_takes_the_idle_cores(default_model, busy_core, tmp_path):
    """With other processes keeping cores busy, the model eval_tasks loads takes the cores
    that are idle, and the run completes."""
    from workbench._cpu import usable_cores

    r = workbench.eval_tasks(default_model, tasks="wb_capitals", limit=6, n_ctx=1024,
                             output=tmp_path / "busy.json", progress=False)
    assert r.score("wb_capitals", "acc").n == 6
    assert r.provenance["model"]["threads"] <= max(1, usable_cores() - busy_core)
