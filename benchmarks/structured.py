"""Structured output and embeddings: what a grammar costs in decode speed, how often a
constrained answer is valid, and how fast texts are embedded.

1. Decode speed under a JSON-schema grammar vs unconstrained: the same extraction prompts,
   greedy, through the workbench's worker, the two modes back to back (which goes first
   alternates); tokens/s after the first token. `grammar_tg_vs_free` = the median over
   prompts of constrained / free, each pair measured under the same load.
2. Schema validity: every constrained answer is parsed and validated against its schema
   (5 schemas, the prompts cycled); `schema_valid_frac` = valid / all.
3. Embeddings: texts/s of `workbench.embed` vs llama-cpp-python's `Llama.embed` on the same
   model and threads (benchmarks/_embed_bench.py); `embed_vs_llama_cpp_python`.

    python benchmarks/structured.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _embed_bench, _provenance  # noqa: E402

TEXTS = [
    "Maria Lopez, 34, teaches chemistry in Valencia.",
    "The order #4471 of 3 red chairs was shipped on 2026-03-02 to Oslo.",
    "Ken Adams (52) runs a bakery in Leeds and employs 6 people.",
    "Flight LH 402 leaves Frankfurt at 13:45 and lands in New York at 16:10.",
    "Room B214 seats 40 students and has 12 computers and one projector.",
    "Aiko Sato, aged 27, is a nurse at a hospital in Osaka.",
    "Invoice 88-12 lists 5 licenses at 120 euros each, due on 1 May.",
    "The river Thames is 346 km long and flows through London.",
]

MAX_TOKENS = 160  # a constrained answer's limit; unconstrained ones run half of it

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                      "city": {"type": "string"}},
     "required": ["name", "age", "city"], "additionalProperties": False},
    {"type": "object", "properties": {"entities": {"type": "array", "items": {"type": "string"},
                                                   "maxItems": 5}},
     "required": ["entities"]},
    {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 120},
                                      "numbers": {"type": "array", "maxItems": 6,
                                                  "items": {"type": "number"}}},
     "required": ["summary", "numbers"]},
    {"type": "object", "properties": {"kind": {"enum": ["person", "place", "thing", "event"]},
                                      "confident": {"type": "boolean"}},
     "required": ["kind", "confident"]},
    {"type": "object", "properties": {"title": {"type": "string"},
                                      "count": {"type": ["integer", "null"]},
                                      "tags": {"type": "array", "maxItems": 4,
                                               "items": {"type": "string"}}},
     "required": ["title", "count"]},
]


def _valid(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def decode_runs(*, threads: int, reps: int, max_tokens: int) -> dict[str, Any]:
    import workbench
    from workbench.errors import GenerationError

    workbench.load_model(progress=False, n_ctx=2048, threads=threads, kv_cache="off")
    workbench.chat("warm up", max_tokens=4, temperature=0)
    tps: dict[str, list[float]] = {"free": [], "grammar": []}
    ratios: list[float] = []  # grammar / free, per prompt, measured back to back
    valid = total = 0
    for rep in range(reps):
        for i, text in enumerate(TEXTS):
            schema = SCHEMAS[(i + rep) % len(SCHEMAS)]
            prompt = f"Extract the facts of this text as JSON.\nText: {text}"
            order = ("free", "grammar") if (rep + i) % 2 == 0 else ("grammar", "free")
            pair: dict[str, float] = {}
            for mode in order:
                if mode == "free":  # as many tokens as a long JSON answer, unconstrained
                    c = workbench.chat(prompt, temperature=0, max_tokens=max_tokens // 2,
                                       ignore_eos=True)
                else:
                    total += 1
                    try:
                        c = workbench.chat(prompt, temperature=0, max_tokens=max_tokens,
                                           schema=schema)
                    except GenerationError as e:  # cut short: counted, as not valid
                        print(f"not valid: {e.message}", file=sys.stderr)
                        continue
                    valid += _valid(c.text, schema)
                if c.metrics.generated_tokens > 1:
                    tps[mode].append(c.metrics.decode_tps)
                    pair[mode] = c.metrics.decode_tps
            if len(pair) == 2:  # back to back: the machine's load is the same for both
                ratios.append(pair["grammar"] / pair["free"])
        print(f"rep {rep + 1}: free {statistics.median(tps['free']):.1f} t/s, grammar "
              f"{statistics.median(tps['grammar']):.1f} t/s, valid {valid}/{total}",
              file=sys.stderr)
    workbench.unload()
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {"tps_median": med, "tps_runs": tps, "valid": valid, "generations": total,
            "paired_ratios": ratios,
            "grammar_tg_vs_free": statistics.median(ratios),
            "schema_valid_frac": valid / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 repetitions; embeddings over 256 texts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    reps = 2 if args.quick else 7  # 7 x 8 = 56 constrained generations over the 5 schemas
    from workbench.api import resolve_model

    model = resolve_model(None)
    dec = decode_runs(threads=args.threads, reps=reps, max_tokens=MAX_TOKENS)
    emb = _embed_bench.run(threads=args.threads, reps=2 if args.quick else 3,
                           n_texts=256 if args.quick else 512)
    _provenance.write("structured", {
        "machine": _provenance.machine(),
        "model": {"path": str(model), "sha256": _provenance.sha256(model)},
        "params": {"threads": args.threads, "reps": reps, "max_tokens": MAX_TOKENS,
                   "schemas": len(SCHEMAS), "texts": len(TEXTS),
                   "measure": "decode tokens/s after the first token, greedy, median"},
        "decode": dec, "embeddings": emb,
    })
    print(_provenance.result_line({
        "grammar_tg_vs_free": dec["grammar_tg_vs_free"],
        "schema_valid_frac": dec["schema_valid_frac"],
        "embed_vs_llama_cpp_python": emb["embed_vs_llama_cpp_python"],
    }))


if __name__ == "__main__":
    main()
