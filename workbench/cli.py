"""The `workbench` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import sys

from .errors import WorkbenchError


def _check(args: argparse.Namespace) -> None:
    """Check that the default model is installed and readable, and (with --run) that the
    engine loads it and generates."""
    from .models.default import DEFAULT_MODEL_NAME, default_model_path
    from .models.gguf_file import read_header

    h = read_header(default_model_path())
    print(f"default model ready: {DEFAULT_MODEL_NAME}, {h.file_size:,} bytes, {h.path}")
    if args.run:
        from . import api

        api.load_model(progress=False, n_ctx=512)
        c = api.generate("Hello", max_tokens=4, temperature=0)
        print(f"engine ready: generated {c.metrics.generated_tokens} tokens at "
              f"{c.metrics.decode_tps:.0f} tokens/s")
        api.engine().close()


def _catalog_validate(args: argparse.Namespace) -> None:
    import json
    import os
    from pathlib import Path

    from .models.catalog import CATALOG_FILE, validate

    path = Path(args.file or os.environ.get("WORKBENCH_CATALOG") or CATALOG_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot read {path}: {e}", "Give a JSON catalog file.") from None
    problems = validate(data)
    for p in problems:
        print(p)
    if problems:
        raise WorkbenchError(f"{path}: {len(problems)} problem(s)", "Fix them and run it again.")
    n = sum(len(m["variants"]) for m in data["models"])
    print(f"{path}: valid, {len(data['models'])} models, {n} files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check the installation and the default model")
    p.add_argument("--run", action="store_true", help="also load the model and generate")
    p.set_defaults(func=_check)
    cat = sub.add_parser("catalog", help="the model catalog")
    cat_sub = cat.add_subparsers(dest="catalog_command", required=True)
    v = cat_sub.add_parser("validate", help="check the catalog file's schema")
    v.add_argument("file", nargs="?", default=None,
                   help="a catalog JSON (default: $WORKBENCH_CATALOG, else the packaged one)")
    v.set_defaults(func=_catalog_validate)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except WorkbenchError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
