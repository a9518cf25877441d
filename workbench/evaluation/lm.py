"""The lm-evaluation-harness model "workbench": task accuracy through the engine.

lm-eval asks a model three things: the log-likelihood of continuations after contexts
(multiple choice, cloze), of whole texts (perplexity tasks), and text generated until a
stop string. Here the first two are the worker's exact sums of token log-probabilities
(`Engine.score`, worker/score.py: float64 from the logits, a shared context decoded
once for all its choices, many requests per decode) and the third is the engine's
greedy or sampled generation. Registered on `import workbench` where lm-eval is
installed, so `lm_eval.simple_evaluate(model="workbench", model_args="model=PATH")`
works.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from lm_eval.api.model import LM

from ..errors import WorkbenchError

DEFAULT_BATCH = 512  # pairs per scoring request: the worker lays them out as one prefix tree

# generate_until's options (lm-eval's gen_kwargs) and what each becomes here
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed",
             "min_p", "repetition_penalty"}


class WorkbenchLM(LM):
    """An lm-eval model backed by a workbench engine.

    `model`: a GGUF path or catalog name, loaded in an engine of its own with
    `settings` (LoadConfig fields, e.g. n_ctx=2048, threads=2). `session`: use that
    session's loaded model instead (what `%eval` does). `batch_size`: pairs per
    scoring request ("auto" or None: 512). `device`: "cpu" keeps every layer on the
    CPU; "cuda"/"gpu" leaves placement to the planner."""

    def __init__(self, model: str | None = None, *, session: Any = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None, progress: Callable[..., Any] | None = None,
                 **settings: Any) -> None:
        super().__init__()
        if session is None:
            from ..session import Session

            if device not in (None, "cpu", "cuda", "gpu") \
                    and not str(device).startswith("cuda:"):
                raise WorkbenchError(f"device={device!r} is not a device of the workbench "
                                     "model", "Use device=cpu, or cuda to let the planner "
                                     "place layers on the GPU.")
            if device == "cpu":
                settings.setdefault("n_gpu_layers", 0)
            session = Session()
            self._finalizer = weakref.finalize(self, session.close)
            session.load(model, progress=False, **settings)
        elif model is not None or settings or device is not None:
            given = ["model"] * (model is not None) + ["device"] * (device is not None) \
                + list(settings)
            raise WorkbenchError("the workbench model takes either a session or a model with "
                                 f"settings, not both (got {', '.join(given)})",
                                 "Leave out the model and settings to use the session's.")
        self.session = session
        self.engine = session.engine
        if self.engine.model is None:
            from ..errors import no_model

            raise no_model()
        self.info = self.engine.model
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.progress = progress
        self.scored_tokens = 0  # tokens through the model, for the speed report
        self.score_seconds = 0.0

    # ---- lm-eval's interface ----------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        # the choices of one question side by side: the worker decodes their context once
        order = sorted(range(len(pairs)), key=lambda i: pairs[i])
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for chunk in self._chunks(order, "loglikelihood"):
            scores = self.engine.score([pairs[i] for i in chunk])
            self._count(scores)
            for i, lp, greedy in zip(chunk, scores.logprobs, scores.greedy):
                out[i] = (float(sum(lp)), bool(greedy))
                self.cache_hook.add_partial("loglikelihood", pairs[i], out[i])
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = [0.0] * len(texts)
        for chunk in self._chunks(list(range(len(texts))), "loglikelihood_rolling", 8):
            scores = self.engine.score([(texts[i], "") for i in chunk], rolling=True)
            self._count(scores)
            for i, lp in zip(chunk, scores.logprobs):
                out[i] = float(sum(lp))
                self.cache_hook.add_partial("loglikelihood_rolling", (texts[i],), out[i])
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for k, r in enumerate(requests):
            context, gen_kwargs = r.args
            params, until = generation_params(gen_kwargs)
            text = self.session.generate(context, **params).text
            for s in until:  # the engine stops on them; cut as lm-eval does
                text = text.split(s)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", r.args, text)
            self._advance("generate_until", k + 1, len(requests))
        return out

    # ---- helpers ----------------------------------------------------------------------

    def _chunks(self, order: list[int], what: str, size: int | None = None):
        size = size or self.batch_size
        for a in range(0, len(order), size):
            yield order[a:a + size]
            self._advance(what, min(a + size, len(order)), len(order))

    def _advance(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    def _count(self, scores: Any) -> None:
        self.scored_tokens += scores.decoded
        self.score_seconds += scores.seconds

    @property
    def tokenizer_name(self) -> str:
        return self.info.name

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        raise WorkbenchError("the workbench model does not apply chat templates in lm-eval",
                             "Leave out --apply_chat_template; %%chat uses the template.")


def _batch_size(batch_size: Any, max_batch_size: Any) -> int:
    if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
        n = DEFAULT_BATCH
    else:
        try:
            n = int(batch_size)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise WorkbenchError(f"batch_size={batch_size!r} is not a positive number",
                                 "Give pairs per scoring request, e.g. batch_size=64, or auto.")
    if max_batch_size not in (None, "", 0):
        n = min(n, int(max_batch_size))
    return n


def generation_params(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The engine's generation settings for lm-eval's `gen_kwargs`, and its stop strings.
    An option the engine has no counterpart for is refused, by name."""
    unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
    if unknown:
        raise WorkbenchError(f"generation option(s) {', '.join(unknown)} of the task are not "
                             "supported by the workbench model",
                             "Supported: " + ", ".join(sorted(_GEN_KEYS)) + ".")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    sample = bool(gen_kwargs.get("do_sample", False))
    temperature = float(gen_kwargs.get("temperature", 1.0 if sample else 0.0))
    params: dict[str, Any] = {"max_tokens": int(gen_kwargs.get("max_gen_toks", 256)),
                              "stop": tuple(s for s in until if s),
                              "temperature": temperature if sample else 0.0}
    for key, name in (("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
                      ("seed", "seed"), ("repetition_penalty", "repeat_penalty")):
        if key in gen_kwargs and gen_kwargs[key] is not None:
            params[name] = gen_kwargs[key]
    return params, [s for s in until if s]
