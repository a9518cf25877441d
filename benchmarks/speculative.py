"""Speculative decoding: how much faster greedy decoding gets when drafts are verified in
batches, by kind of prompt, against plain decoding and against llama.cpp's own.

1. Six prompt categories, 8 user messages each (benchmarks/data/speculative/), rendered
   with the model's chat template, 256 tokens greedy (stopping at end of turn):
   code (repeat a ~50-70 line Python file with one named change), retrieval (quote a
   document's passage on a topic word for word), summarize (the same documents), free
   writing, chat questions, arithmetic.
2. For each prompt, back to back in an order that rotates from prompt to prompt (the
   machine's load changes, so each pair is measured under the same load), the workbench's
   modes (`speculative="off"|"ngram"|"model"|"auto"`, the draft a copy of the model with
   --prune K layers removed) and llama.cpp's speculative programs built from the source
   this llama-cpp-python vendors, on the same rendered prompt text, tokens, threads and
   context: llama-lookup (n-gram prompt lookup) and llama-speculative-simple (--spec-type
   ngram-simple / ngram-map-k, and the same pruned draft GGUF as draft-simple).
   Decode tokens/s = tokens after the first / seconds from the first to the last token
   (the workbench's `metrics.decode_tps`; llama.cpp's "decoded N tokens" line).
3. Per category: each mode's ratio to plain is the median over prompts of the per-prompt
   ratio (paired); acceptance = accepted / drafted tokens; llama-bench's tg128 at a depth
   of the category's mean prompt tokens, as llama.cpp's plain decode speed there.
4. `identical_greedy` = 1 when every speculative output equals the plain output of the
   same prompt byte for byte.

    python benchmarks/speculative.py [--quick] [--threads N] [--prune K] [--modes ...]
                                     [--native ...] [--categories ...]
                                     [--model PATH] [--gpu [--bin DIR]]

--gpu (a CUDA build, see benchmarks/gpu/speculative.sh): the engine loads with every layer
on the GPU (n_gpu_layers=-1), llama.cpp's programs run from DIR (default
$LLAMA_CPP_LIB_PATH) with -ngl 99, and the results go to speculative_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _native, _provenance  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "speculative"
CATEGORIES = ("code", "retrieval", "summarize", "free", "chat", "arithmetic")
MODES = ("off", "ngram", "model", "auto")  # the workbench's speculative= values
MAX_TOKENS = 256
KV_FLAGS = ("-fa", "on", "-ctv", "q8_0")  # as the engine is loaded (load_engine)
N_CTX = 4096  # the engine's context; prompt + answer stay within 2048
PROMPT_LIMIT = 2048

# llama.cpp's speculative decoding: program and the flags that pick the method ({draft}
# is the pruned draft GGUF, {t} the threads)
NATIVE: dict[str, tuple[str, tuple[str, ...]]] = {
    "lookup": ("llama-lookup", ()),
    "ngram-simple": ("llama-speculative-simple", ("--spec-type", "ngram-simple")),
    "ngram-map-k": ("llama-speculative-simple", ("--spec-type", "ngram-map-k")),
    "draft": ("llama-speculative-simple", ("--spec-type", "draft-simple", "-md", "{draft}",
                                           "-td", "{t}")),
}

# --gpu: llama.cpp's programs come from a CUDA build's folder, every layer on the GPU
GPU_BIN: Path | None = None
NGL: tuple[str, ...] = ()


def _program(name: str, example: bool) -> Path:
    """llama.cpp's program `name`: from GPU_BIN with --gpu, else built here once."""
    if GPU_BIN is not None:
        if not (GPU_BIN / name).exists():
            raise SystemExit(f"--gpu: {GPU_BIN / name} not found (build it with CUDA first)")
        return GPU_BIN / name
    return _native.build_example(name) if example else _native.build_tool(name)


# ---- prompts ---------------------------------------------------------------------------

def messages() -> dict[str, list[str]]:
    """The user messages of each category, from benchmarks/data/speculative."""
    spec = json.loads((DATA / "prompts.json").read_text())
    out: dict[str, list[str]] = {}
    out["code"] = [
        f"```python\n{(DATA / 'code' / c['file']).read_text()}```\n\nCopy the file above "
        f"exactly, with one change: {c['change']}. Write the complete file in a code block."
        for c in spec["code"]]
    doc = {name: (DATA / "documents" / name).read_text().strip()
           for name in spec["summarize"]}
    out["retrieval"] = [
        f"{doc[r['file']]}\n\nQuote, word for word, the sentences of the text above about "
        f"{r['topic']}. Copy them exactly as they are written." for r in spec["retrieval"]]
    out["summarize"] = [f"{doc[name]}\n\nSummarize the text above in a few sentences."
                        for name in spec["summarize"]]
    for cat in ("free", "chat", "arithmetic"):
        out[cat] = list(spec[cat])
    return out


def render(model: Path, message: str) -> str:
    """The prompt text the engine decodes for `message`: the GGUF's chat template, as the
    worker renders it (worker/template.py), ending with the assistant's turn."""
    from workbench.models.gguf_file import read_header
    from workbench.worker.template import render_chat

    source = read_header(model).chat_template
    # the worker fills bos/eos with the vocabulary's texts; this template uses neither
    assert "bos_token" not in source and "eos_token" not in source, "template needs bos/eos"
    return render_chat(source, [{"role": "user", "content": message}], "", "", model.name)


def token_counts(model: Path, texts: list[str]) -> list[int]:
    """Tokens of each rendered prompt (special tokens parsed, no BOS: the GGUF adds none)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    return [len(llm.tokenize(t.encode(), add_bos=False, special=True)) for t in texts]


# ---- llama.cpp's programs --------------------------------------------------------------

_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")
_ACCEPT = re.compile(r"n_accept\s*=\s*(\d+)")


@dataclass
class Run:
    """One generation: decode tokens/s, its text, and the drafts (None: not reported)."""
    tps: float
    text: str
    tokens: int
    drafted: int | None = None
    accepted: int | None = None


def native_run(name: str, model: Path, prompt_file: Path, *, threads: int, draft: Path | None,
               max_tokens: int) -> Run:
    """One llama.cpp speculative generation of the rendered prompt in `prompt_file`."""
    program, flags = NATIVE[name]
    exe = _program(program, example=True)
    args = [a.format(draft=draft, t=threads) for a in flags]
    if NGL and "-md" in args:  # the draft model on the GPU too
        args += ["-ngld", NGL[1]]
    cmd = [str(exe), "-m", str(model), "-f", str(prompt_file), "-n", str(max_tokens),
           "--temp", "0", "-t", str(threads), "-c", str(N_CTX), *KV_FLAGS, *NGL, *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = _DECODED.search(r.stderr)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-800:]}")
    n, secs = int(m.group(1)), float(m.group(2))
    drafted, accepted = _DRAFTED.search(r.stderr), _ACCEPT.search(r.stderr)
    # stdout echoes the prompt, then the answer; the answer follows the assistant header
    text = r.stdout.rsplit("<|im_start|>assistant\n", 1)[-1].rstrip("\n")
    text = text.split("<|im_end|>", 1)[0]  # the workbench's text ends before end of turn
    # "decoded" counts every token after the prompt over the time after the prompt's batch:
    # the first token's time is in it, as one of n
    return Run(tps=(n - 1) / secs if n > 1 else 0.0, text=text, tokens=n,
               drafted=int(drafted.group(1)) if drafted else None,
               accepted=int(accepted.group(1)) if accepted else None)


def llama_bench_tg(model: Path, depth: int, threads: int, reps: int = 3) -> float:
    """llama-bench's tg128 tokens/s with `depth` tokens already in the context."""
    exe = _program("llama-bench", example=False)
    out = subprocess.run([str(exe), "-m", str(model), "-p", "0", "-n", "128", "-d",
                          str(depth), "-t", str(threads), "-r", str(reps), "-o", "json",
                          *KV_FLAGS, *NGL],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


# ---- the workbench ---------------------------------------------------------------------

def load_engine(threads: int, prune: int, modes: list[str], model: str | None = None,
                gpu: bool = False) -> None:
    import workbench

    kwargs: dict[str, Any] = {"n_gpu_layers": -1} if gpu else {}
    if {"model", "auto"} & set(modes):  # the draft's API; the only call to adjust here
        kwargs["draft"] = f"pruned:{prune}"
    # The prefix cache off: a restored prompt computes its last token alone, which can
    # change a greedy answer whatever the drafts. V in q8_0: with f16 V, llama.cpp's CPU
    # attention computes a lone token past 256 cells differently from a batch (a split-KV
    # reduction), so identity could not be asked of any speculative decoder; llama.cpp
    # runs with the same cache types.
    workbench.load_model(model, progress=False, threads=threads, n_ctx=N_CTX,
                         kv_cache="off", flash_attn="on", type_v="q8_0", **kwargs)
    workbench.chat("warm up", max_tokens=4, temperature=0)


def engine_run(message: str, mode: str, max_tokens: int) -> Run:
    import workbench

    # named even for "off": a request's default is "auto"
    c = workbench.chat(message, max_tokens=max_tokens, temperature=0, ignore_eos=False,
                       speculative=mode)
    m = c.metrics
    return Run(tps=m.decode_tps, text=c.text, tokens=m.generated_tokens,
               drafted=getattr(m, "draft_tokens", None),
               accepted=getattr(m, "accepted_tokens", None))


# ---- the measurement -------------------------------------------------------------------

@dataclass
class Category:
    """Every run of one category: runs[mode][prompt] is that prompt's list of Runs."""
    name: str
    prompt_tokens: list[int]
    runs: dict[str, list[list[Run]]] = field(default_factory=dict)


def measure(cat: Category, msgs: list[str], texts: list[str], lanes: list[str], *, model: Path,
            threads: int, draft: Path | None, reps: int, max_tokens: int,
            scratch: Path, turn: int) -> int:
    """Every lane (workbench mode, or "llama.cpp:NAME") on every prompt, back to back in
    an order that rotates from one prompt (and repetition) to the next."""
    cat.runs = {lane: [[] for _ in msgs] for lane in lanes}
    for rep in range(reps):
        for i, (msg, text) in enumerate(zip(msgs, texts)):
            prompt_file = scratch / f"{cat.name}-{i}.txt"
            prompt_file.write_text(text + "\n")  # llama.cpp's -f drops one final newline
            k = turn % len(lanes)
            turn += 1
            for lane in lanes[k:] + lanes[:k]:
                if lane.startswith("llama.cpp:"):
                    run = native_run(lane.split(":", 1)[1], model, prompt_file,
                                     threads=threads, draft=draft, max_tokens=max_tokens)
                else:
                    run = engine_run(msg, lane, max_tokens)
                cat.runs[lane][i].append(run)
        tps = {lane: statistics.median(r.tps for p in cat.runs[lane] for r in p)
               for lane in lanes}
        print(f"{cat.name} rep {rep + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in tps.items())
              + " t/s", file=sys.stderr)
    return turn


def summarize(cat: Category, base: str) -> dict[str, Any]:
    """Per lane: median tokens/s, the paired ratio to `base`, acceptance, and whether its
    texts equal the base's."""
    out: dict[str, Any] = {"prompts": len(cat.prompt_tokens),
                           "mean_prompt_tokens": statistics.mean(cat.prompt_tokens),
                           "max_prompt_tokens": max(cat.prompt_tokens), "lanes": {}}
    for lane, per_prompt in cat.runs.items():
        runs = [r for p in per_prompt for r in p]
        lane_out: dict[str, Any] = {
            "tps_median": statistics.median(r.tps for r in runs),
            "tps_per_prompt": [[round(r.tps, 2) for r in p] for p in per_prompt],
            "mean_generated_tokens": statistics.mean(r.tokens for r in runs),
        }
        drafted = [r.drafted for r in runs if r.drafted is not None]
        if drafted and sum(drafted):
            lane_out["drafted"] = sum(drafted)
            lane_out["accepted"] = sum(r.accepted or 0 for r in runs)
            lane_out["acceptance"] = lane_out["accepted"] / lane_out["drafted"]
        if base in cat.runs and lane != base:
            ratios = []  # per prompt: the median of its back-to-back pairs
            for mine, theirs in zip(per_prompt, cat.runs[base]):
                pairs = [a.tps / b.tps for a, b in zip(mine, theirs) if b.tps > 0]
                if pairs:
                    ratios.append(statistics.median(pairs))
            lane_out["vs_plain"] = statistics.median(ratios)
            lane_out["vs_plain_per_prompt"] = [round(x, 3) for x in ratios]
            pairs = [(a.text, b.text) for mine, theirs in zip(per_prompt, cat.runs[base])
                     for a, b in zip(mine, theirs)]
            # where each text first parts from the plain one (None: never), to find why
            lane_out["diverges_at_char"] = [_diverges(a, b) for a, b in pairs]
            if lane.startswith("llama.cpp:"):  # it may stop a draft's length past the limit
                same = [a.startswith(b) or b.startswith(a) for a, b in pairs]
                lane_out["prefix_agrees_with_plain"] = sum(same) / len(same)
            else:
                lane_out["identical_to_plain"] = sum(a == b for a, b in pairs) / len(pairs)
        out["lanes"][lane] = lane_out
    return out


def _diverges(a: str, b: str) -> int | None:
    n = min(len(a), len(b))
    i = next((i for i in range(n) if a[i] != b[i]), n)
    return None if i == n and len(a) == len(b) else i


def paired(cat: Category, a: str, b: str) -> float:
    """The median over prompts of a's tokens/s / b's, each prompt's runs paired."""
    ratios = [statistics.median(x.tps / y.tps for x, y in zip(pa, pb) if y.tps > 0)
              for pa, pb in zip(cat.runs[a], cat.runs[b])]
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=0,
                    help="repetitions of each prompt (default: 1 with --quick, else 2)")
    ap.add_argument("--quick", action="store_true",
                    help="3 prompts per category, 1 repetition (8 prompts, 2 without)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prune", type=int, default=6, metavar="K",
                    help="layers removed from the model (30 layers) to make the draft")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="the workbench's speculative modes to run; '' for none "
                         "(\"off\" is the plain baseline)")
    ap.add_argument("--native", default=",".join(NATIVE),
                    help=f"llama.cpp speculative programs to run ({', '.join(NATIVE)}); "
                         "'' for none")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--model", default=None, metavar="PATH",
                    help="GGUF file to measure (default: the default model)")
    ap.add_argument("--model-note", default=None,
                    help="how the --model file was made (recorded with its sha256)")
    ap.add_argument("--gpu", action="store_true",
                    help="every layer on the GPU (a CUDA build); writes speculative_gpu.json")
    ap.add_argument("--bin", default=None, metavar="DIR",
                    help="with --gpu: the CUDA build's programs (default: $LLAMA_CPP_LIB_PATH)")
    args = ap.parse_args()
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    modes, native, cats = split(args.modes), split(args.native), split(args.categories)
    for name, allowed, got in (("mode", MODES, modes), ("native", NATIVE, native),
                               ("category", CATEGORIES, cats)):
        if bad := set(got) - set(allowed):
            ap.error(f"unknown {name} {', '.join(sorted(bad))}: choose from {', '.join(allowed)}")
    n_prompts, reps = (3, 1) if args.quick else (8, 2)
    reps = args.reps or reps

    import workbench
    from workbench.api import resolve_model

    global GPU_BIN, NGL
    if args.gpu:
        import os

        GPU_BIN = Path(args.bin or os.environ.get("LLAMA_CPP_LIB_PATH") or "/tmp/llama-build/bin")
        NGL = ("-ngl", "99")
    model = resolve_model(args.model)
    scratch = _provenance.scratch("spec-bench-")
    machine = _provenance.machine()
    draft: Path | None = None
    if "draft" in native:  # the same pruned copy the engine drafts with
        draft = workbench.prune(args.model, layers=args.prune, out=scratch / "draft.gguf",
                                progress=False).path
    msgs = messages()
    lanes = modes + [f"llama.cpp:{n}" for n in native]
    base = "off" if "off" in modes else None
    if modes:
        load_engine(args.threads, args.prune, modes, args.model, args.gpu)
    results: dict[str, Any] = {}
    cat_runs: dict[str, Category] = {}
    turn = 0
    t0 = time.time()
    for name in cats:
        ms = msgs[name][:n_prompts]
        texts = [render(model, m) for m in ms]
        counts = token_counts(model, texts)
        if max(counts) + args.max_tokens > PROMPT_LIMIT:
            raise SystemExit(f"{name}: a prompt of {max(counts)} tokens leaves no room for "
                             f"{args.max_tokens} within {PROMPT_LIMIT}")
        cat = Category(name, counts)
        turn = measure(cat, ms, texts, lanes, model=model, threads=args.threads, draft=draft,
                       reps=reps, max_tokens=args.max_tokens, scratch=scratch, turn=turn)
        cat_runs[name] = cat
        results[name] = summarize(cat, base) if base else summarize(cat, "")
        depth = round(statistics.mean(counts))
        results[name]["llama_bench_tg128_at_depth"] = {
            "depth": depth, "tps": llama_bench_tg(model, depth, args.threads)}
    if modes:
        workbench.unload()

    keys = result_keys(cat_runs, results, modes, native)
    _provenance.write("speculative_gpu" if args.gpu else "speculative", {
        "machine": machine,
        **({"gpu": _gpu_info()} if args.gpu else {}),
        "llama_cpp": _llama_cpp_version(),
        "model": {"path": str(model), "sha256": _provenance.sha256(model),
                  **({"made": args.model_note} if args.model_note else {})},
        "draft": {"prune_layers": args.prune,
                  "sha256": _provenance.sha256(draft) if draft else None},
        "params": {"threads": args.threads, "max_tokens": args.max_tokens, "n_ctx": N_CTX,
                   "prompts_per_category": n_prompts, "reps": reps, "greedy": True,
                   "stops_at_end_of_turn": True, "modes": modes,
                   "native": {n: {"program": NATIVE[n][0],
                                  "flags": ["-n", str(args.max_tokens), "--temp", "0", "-t",
                                            str(args.threads), "-c", str(N_CTX), *NGL,
                                            *KV_FLAGS, *NATIVE[n][1]]}
                              for n in native},
                   "measure": "decode tokens/s after the first token; per-category ratios "
                              "are the median over prompts of back-to-back pairs",
                   "seconds": round(time.time() - t0)},
        "categories": results,
        "summary": keys,
    })
    print(_provenance.result_line(keys))


def result_keys(cats: dict[str, Category], results: dict[str, Any], modes: list[str],
                native: list[str]) -> dict[str, Any]:
    """The RESULT line: auto's ratios to plain, to llama-bench's plain decode at the same
    depth and to llama.cpp's fastest speculative program, on code; identical_greedy."""
    keys: dict[str, Any] = {}
    spec = [m for m in modes if m != "off"]
    if "off" in modes and spec:
        keys["identical_greedy"] = int(all(
            lane.get("identical_to_plain", 1) == 1 for r in results.values()
            for name, lane in r["lanes"].items() if name in spec))
    best = "auto" if "auto" in modes else next(iter(spec), None)
    if best is None:
        best = "off" if "off" in modes else None
    if best is not None and best != "off":
        ratios = {c: r["lanes"][best]["vs_plain"] for c, r in results.items()}
        if "code" in ratios:
            keys["spec_code_vs_plain"] = ratios["code"]
        if "retrieval" in ratios:
            keys["spec_retrieval_vs_plain"] = ratios["retrieval"]
        worst = min(ratios, key=ratios.get)
        keys["spec_worst_vs_plain"] = ratios[worst]
        keys["spec_worst_category"] = worst
        if "ngram" in modes and "code" in results:
            keys["ngram_code_vs_plain"] = results["code"]["lanes"]["ngram"]["vs_plain"]
    if "code" in results:
        code = results["code"]
        lanes = code["lanes"]
        if best is not None:
            keys["spec_code_vs_native"] = (lanes[best]["tps_median"]
                                           / code["llama_bench_tg128_at_depth"]["tps"])
        fastest = max((f"llama.cpp:{n}" for n in native),
                      key=lambda lane: lanes[lane]["tps_median"], default=None)
        if fastest is not None:
            keys["llamacpp_spec_code_tps"] = lanes[fastest]["tps_median"]
            keys["llamacpp_spec_best"] = fastest.split(":", 1)[1]
            if best is not None:
                keys["spec_code_vs_llamacpp_spec"] = paired(cats["code"], best, fastest)
        if best is not None:
            keys["spec_mode"] = best
    return keys


def _llama_cpp_version() -> dict[str, Any]:
    import llama_cpp

    src = _native.CACHE / f"llama.cpp-{llama_cpp.__version__}" / "src"
    if GPU_BIN is not None:  # the CUDA build of the same vendored source
        return {"llama_cpp_python": llama_cpp.__version__, "cuda_build": str(GPU_BIN)}
    return {"llama_cpp_python": llama_cpp.__version__, "vendored_source": str(src)}


def _gpu_info() -> dict[str, Any]:
    """The GPU (--gpu): nvidia-smi's name, memory and driver; where the layers went."""
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                        "--format=csv,noheader"], capture_output=True, text=True)
    return {"nvidia_smi": r.stdout.strip() or r.stderr.strip()[-200:],
            "n_gpu_layers": -1, "llama_cpp_flags": list(NGL)}


if __name__ == "__main__":
    main()
