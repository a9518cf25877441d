"""Importance-matrix quantization: what weighing the rounding by the inputs buys.

The default model's F16 copy quantized to Q4_0, Q2_K and Q4_K_M, each without and with an
importance matrix measured on calibration text (`workbench.quantize(..., imatrix=True)`);
KL divergence and top-1 agreement against the F16 copy on the evaluation text (other
docstrings than the calibration's), all variants on the same tokens in one run.

Usage: python benchmarks/imatrix.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _provenance  # noqa: E402

TYPES = ("Q4_0", "Q2_K", "Q4_K_M")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer evaluation chunks")
    args = ap.parse_args()

    import workbench
    from workbench.compress.text import stdlib_text, text_sha256
    from workbench.models.default import default_model_path

    src = default_model_path()
    chunks = 4 if args.quick else 16
    out = _provenance.scratch("wb-imatrix-")
    text = stdlib_text()
    ref = workbench.quantize(src, "f16", out / "ref.F16.gguf", progress=False)
    files = {}
    for q in TYPES:
        files[q] = workbench.quantize(ref, q, out / f"m.{q}.gguf", progress=False)
        files[q + "+imatrix"] = workbench.quantize(ref, q, out / f"m-imatrix.{q}.gguf",
                                                   imatrix=True, progress=False)
    ev = workbench.evaluate(list(files.values()), reference=ref, max_chunks=chunks,
                            progress=False, text=text)
    print(repr(ev), file=sys.stderr)
    rows = {k: {"file": v.path.name, "bytes": v.bytes, "perplexity": ev.row(v.path).perplexity,
                "kl_mean": ev.row(v.path).kl_mean, "top1": ev.row(v.path).top1}
            for k, v in files.items()}
    values = {}
    for q in TYPES:
        values[f"{q.lower()}_kl"] = rows[q]["kl_mean"]
        values[f"{q.lower()}_imatrix_kl"] = rows[q + "+imatrix"]["kl_mean"]
        values[f"{q.lower()}_kl_ratio"] = rows[q + "+imatrix"]["kl_mean"] / rows[q]["kl_mean"]
    result = {"machine": _provenance.machine(), "model": src.name,
              "model_sha256": _provenance.sha256(src),
              "params": {"quick": args.quick, "n_ctx": 512, "max_chunks": chunks,
                         "text": "Python standard library docstrings",
                         "text_sha256": text_sha256(text), "imatrix_tokens": 1024,
                         "source": "F16 copy of the default model"},
              "tokens_scored": ev.tokens_scored, "rows": rows, "result": values}
    path = _provenance.write("imatrix", result)
    print(f"wrote {path}", file=sys.stderr)
    print(_provenance.result_line(values))


if __name__ == "__main__":
    main()
