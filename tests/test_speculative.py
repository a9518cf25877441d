"""Speculative decoding through the real worker and the default model: drafts from n-gram
lookup and from a pruned copy of the model, checked by the model in one decode.

Greedy output must be the same tokens with and without drafts, alone and in a batch;
sampled output must keep the model's distribution; every bad draft fails clearly and
leaves the loaded model working.

Where outputs are compared across requests, two things that change a greedy answer
whether or not anything is drafted are kept out: the prefix cache is off (a restored
prompt computes its last token alone), and V is cached in q8_0 (with f16 V, llama.cpp's
CPU attention computes a lone token past 256 cells with a split-KV reduction, and its
logits then differ from the same token's in a batch by up to 0.5).
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest

import workbench
from workbench.errors import GenerationError, ModelFileError, WorkbenchError

CODE = Path(workbench.__file__).parent.joinpath("_text.py").read_text()
SAME = dict(kv_cache="off", flash_attn="on", type_v="q8_0")  # see the docstring
PROMPTS = [
    "Repeat this file exactly, but rename check_text to validate_text:\n\n" + CODE[:900],
    "Copy this list twice: apples, pears, plums, cherries, grapes, melons, figs.",
    "Count from 1 to 30, separated by commas.",
    "Write a short story about a cat who learns to swim.",
    "Explain how a bicycle gear works in three sentences.",
    "What is 17 times 23? Show your steps.",
    "Say 'hello world' five times, one per line.",
    "List the planets of the solar system with one fact each.",
]


@pytest.fixture()
def spec_model(default_model):
    """The default model with a pruned self-draft (the model less 6 of its 30 layers),
    4096 tokens of context, loaded as SAME says (reused while the engine holds it)."""
    from workbench.results import LoadedModel

    e = workbench.engine()
    info = e.model if e.alive else None
    if not (info is not None and info.draft.endswith("less6.gguf") and info.n_ctx == 4096
            and info.type_v == "q8_0" and info.n_parallel == 1):
        return workbench.load_model(progress=False, n_ctx=4096, draft="pruned:6", **SAME)
    return LoadedModel(info)


@pytest.mark.parametrize("mode", ["ngram", "model", "auto"])
def test_greedy_output_is_identical_with_drafts(spec_model, mode):
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain = workbench.chat(prompt, temperature=0, max_tokens=64, speculative="off")
        spec = workbench.chat(prompt, temperature=0, max_tokens=64, speculative=mode)
        assert spec.text == plain.text, prompt[:40]
        assert plain.metrics.draft_tokens == 0
        assert spec.metrics.generated_tokens == plain.metrics.generated_tokens
        drafted += spec.metrics.draft_tokens
        accepted += spec.metrics.accepted_tokens
    assert drafted > 0 and 0 <= accepted <= drafted
    if mode == "ngram":  # copying text is what n-gram lookup is for (how long its drafts
        assert accepted >= 10  # run, and so the share kept, follows the measured costs)


def test_greedy_output_is_identical_in_the_batch(default_model):
    workbench.load_model(progress=False, n_ctx=4096, n_parallel=4, **SAME)
    try:
        plain = workbench.generate_many(PROMPTS, chat=True, temperature=0, max_tokens=80,
                                        speculative="off")
        spec = workbench.generate_many(PROMPTS, chat=True, temperature=0, max_tokens=80,
                                       speculative="ngram")
        assert [c.text for c in spec] == [c.text for c in plain]
        assert sum(c.metrics.accepted_tokens for c in spec) > 0
        alone = workbench.chat(PROMPTS[1], temperature=0, max_tokens=80, speculative="off")
        assert alone.text == plain[1].text
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_sampling_with_a_seed_is_the_same_draw(spec_model):
    """Drafts are checked by drawing from the model at each position with the request's
    own sampler, so a seeded request draws the same tokens with and without drafts."""
    for seed in range(6):
        for mode in ("ngram", "model"):
            kw = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                      max_tokens=48)
            a = workbench.chat(PROMPTS[1], speculative="off", **kw).text
            b = workbench.chat(PROMPTS[1], speculative=mode, **kw)
            assert b.text == a, (seed, mode)


def _gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) (Numerical Recipes'
    series and continued fraction)."""
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # series for P
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-12:
            n += 1
            term *= x / n
            total += term
        return 1.0 - total * math.exp(log_front)
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-12:
            break
    return math.exp(log_front) * h


def _chi2_same(a: collections.Counter, b: collections.Counter) -> float:
    """p-value of a chi-square test that two samples come from one distribution (rare
    categories pooled so that every expected count is at least 5)."""
    n_a, n_b = sum(a.values()), sum(b.values())
    rows, other = [], [0, 0]
    for key in set(a) | set(b):
        if (a[key] + b[key]) * min(n_a, n_b) / (n_a + n_b) >= 5:
            rows.append([a[key], b[key]])
        else:
            other[0] += a[key]
            other[1] += b[key]
    if sum(other):
        rows.append(other)
    if len(rows) < 2:
        return 1.0
    stat = 0.0
    for row in rows:
        for count, n in zip(row, (n_a, n_b)):
            expected = sum(row) * n / (n_a + n_b)
            stat += (count - expected) ** 2 / expected
    return _gamma_q((len(rows) - 1) / 2, stat / 2)


def test_sampled_output_keeps_the_models_distribution(default_model):
    """Unseeded draws at temperature 1 on a prompt whose text repeats, so drafts are made
    and some rejected: at each position, the distribution of tokens is the same with
    drafts as without (a chi-square test per position)."""
    workbench.load_model(progress=False, n_ctx=2048, **SAME)
    try:
        prompt = "1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2"
        n = 160
        kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16,
                  ignore_eos=True)
        plain = workbench.generate_many([prompt] * n, speculative="off", **kw)
        spec = workbench.generate_many([prompt] * n, speculative="ngram", **kw)
        drafted = sum(c.metrics.draft_tokens for c in spec)
        accepted = sum(c.metrics.accepted_tokens for c in spec)
        assert drafted > 150 and 0 < accepted < drafted  # drafts were made and rejected
        p_values = []
        for pos in range(1, 16):
            a = collections.Counter(c.token_ids[pos] for c in plain)
            b = collections.Counter(c.token_ids[pos] for c in spec)
            p_values.append(_chi2_same(a, b))
        # fifteen tests at 0.001: a family-wise error of 1.5% at most
        assert min(p_values) > 0.001, p_values
        # and the draws vary: a test with power
        assert len({c.text for c in plain}) > 40
    finally:
        workbench.load_model(progress=False, n_ctx=2048)


def test_the_controller_wastes_few_drafts(spec_model):
    """Free text: the controller drafts where the text repeats and holds back where it
    does not, so few drafted tokens are checked in vain."""
    for prompt in ("Write a poem about the sea in eight lines.",
                   "What is 12 times 34? Explain."):
        m = workbench.chat(prompt, temperature=0, max_tokens=160,
                           speculative="ngram").metrics
        assert m.draft_tokens - m.accepted_tokens < m.generated_tokens / 4, m


def test_metrics_and_streamed_counts(spec_model):
    s = workbench.generate("1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2", temperature=0,
                           max_tokens=64, speculative="ngram", stream=True)
    counts = []
    for _ in s:
        counts.append((s.drafted, s.accepted))
    c = s
    assert c.metrics.speculative == "ngram" and c.metrics.draft_tokens > 0
    assert counts[-1] == (c.metrics.draft_tokens, c.metrics.accepted_tokens)
    assert c.metrics.acceptance == pytest.approx(
        c.metrics.accepted_tokens / c.metrics.draft_tokens)
    assert "draft" in repr(spec_model) and "less6" in spec_model.info.draft


# ---- bad inputs: each fails clearly, and the loaded model keeps working ---------------


def _still_works(name: str) -> None:
    assert workbench.engine().model.name == name
    assert workbench.chat("Say hi.", temperature=0, max_tokens=4).text


def test_bad_requests(spec_model):
    with pytest.raises(GenerationError, match="speculative must be"):
        workbench.chat("hi", speculative="fast")
    workbench.load_model(progress=False, n_ctx=1024, draft="off", **SAME)
    with pytest.raises(GenerationError, match="needs a draft model") as e:
        workbench.chat("hi", speculative="model")
    assert "--draft" in e.value.hint
    c = workbench.chat(PROMPTS[1], temperature=0, max_tokens=32)  # off: nothing drafted
    assert c.metrics.draft_tokens == 0 and c.metrics.speculative == ""
    c = workbench.chat(PROMPTS[1], temperature=0, max_tokens=32, speculative="ngram")
    assert c.metrics.speculative == "ngram"  # asked for: honored
    _still_works(spec_model.name)


@pytest.mark.parametrize("draft, words", [
    ("pruned:abc", "layer count"), ("pruned:0", "has 30 layers"),
    ("pruned:30", "has 30 layers"), ("/nonexistent/draft.gguf", "not a file"),
])
def test_bad_draft_settings(spec_model, draft, words):
    name = spec_model.name
    with pytest.raises(WorkbenchError, match=words):
        workbench.load_model(progress=False, n_ctx=1024, draft=draft)
    _still_works(name)


def test_corrupt_and_oversized_drafts(spec_model, default_model, tmp_path):
    from gguf_edit import truncated

    name = spec_model.name
    bad = truncated(default_model, tmp_path / "cut.gguf", 40_000)
    with pytest.raises(ModelFileError):
        workbench.load_model(progress=False, n_ctx=1024, draft=str(bad))
    _still_works(name)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ModelFileError):
        workbench.load_model(progress=False, n_ctx=1024, draft=str(junk))
    _still_works(name)
    with pytest.raises(ModelFileError, match="not smaller than") as e:
        workbench.load_model(progress=False, n_ctx=1024, draft=str(default_model))
    assert "pruned:K" in e.value.hint
    _still_works(name)


def test_a_draft_with_another_vocabulary(default_model, tmp_path):
    """The embedding model (BERT's 30,522 tokens) as a draft: smaller, and useless."""
    from workbench.models.bert_gguf import minilm_gguf
    from workbench.drafts import DraftError

    with pytest.raises(DraftError, match="vocabulary") as e:
        workbench.load_model(progress=False, n_ctx=1024, draft=str(minilm_gguf()))
    assert "loaded and works" in e.value.message and "same" in e.value.hint
    info = workbench.engine().model
    assert info.path == str(default_model) and info.draft == "auto"
    _still_works(info.name)


def test_a_draft_that_does_not_fit(spec_model, default_model):
    """The RAM budget holds the model but not the model and its draft."""
    from workbench.drafts import DraftError

    with pytest.raises(DraftError, match="more than the") as e:
        workbench.load_model(progress=False, n_ctx=8192, ram_mib=450, type_k="f16",
                             type_v="f16", draft="pruned:6")
    assert "--ram-mib 450" in e.value.message and "ngram" in e.value.hint
    _still_works(spec_model.name)


def test_the_chi_square_p_value():
    from scipy.stats import chi2  # only to check ours, where it is installed

    for df, x in ((1, 0.5), (3, 7.8), (10, 3.0), (20, 40.0)):
        assert math.isclose(_gamma_q(df / 2, x / 2), chi2.sf(x, df), rel_tol=1e-8)


def test_expected_tokens_and_draft_length():
    from workbench.worker.speculative import CostModel, best_length, expected_tokens

    assert expected_tokens(0.0, 5) == 1 and expected_tokens(1.0, 4) == 5
    assert math.isclose(expected_tokens(0.5, 2), 1.75)
    costs = CostModel()
    for n, t in ((1, 0.010), (2, 0.018), (4, 0.028), (8, 0.045), (16, 0.080)):
        costs.record(n, t)  # a CPU: each extra token costs about half a decode
    assert best_length(0.2, costs, 16) == 0  # rarely right: never worth checking
    assert best_length(0.95, costs, 16) >= 6  # nearly always right: long drafts
    flat = CostModel()
    for n in (1, 4, 16):
        flat.record(n, 0.010)  # a GPU: checking 16 costs what one does
    assert best_length(0.6, flat, 16) > best_length(0.6, costs, 16)
