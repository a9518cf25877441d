"""The `workbench` command: a thin layer over the public API."""

from __future__ import annotations

import argparse
import os
import sys

from .config import DeployConfig, EvalConfig, LoadConfig, add_flags
from .errors import WorkbenchError


def _check(args: argparse.Namespace) -> None:
    """Check that the default model is installed and readable, and (with --run) that the
    engine loads it and generates."""
    from .models.default import DEFAULT_MODEL_NAME, default_model_path
    from .models.gguf_file import read_header

    h = read_header(default_model_path())
    print(f"default model ready: {DEFAULT_MODEL_NAME}, {h.file_size:,} bytes, {h.path}")
    from ._extras import EXTRAS, install_command, missing

    for extra in EXTRAS:
        gone = missing(extra)
        where = " on a CUDA machine" if extra == "qlora" else ""
        print(f"extra [{extra}]: " + ("installed" if not gone else
                                      f"not installed ({install_command(extra)}{where})"))
    from .settings import defaults, path

    if path().exists():
        print(f"settings: {path()}: {', '.join(sorted(defaults())) or 'none'}")
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


def _report(args: argparse.Namespace) -> None:
    """Run notebooks/06-benchmark-report.ipynb headless (papermill) with these values."""
    import tempfile
    from pathlib import Path

    from . import report

    names = report.check_names([n.strip() for n in args.benchmarks.split(",") if n.strip()])
    out = report.check_out(args.out)  # before anything runs
    if not report.NOTEBOOK.exists():
        raise WorkbenchError(f"the report notebook is not at {report.NOTEBOOK}",
                             "The installed package is incomplete: reinstall it.")
    from ._extras import require

    require("report", "`workbench report`")
    import papermill

    executed = Path(args.notebook).expanduser() if args.notebook else \
        Path(tempfile.mkdtemp(prefix="workbench-report-")) / report.NOTEBOOK.name
    print(f"running {', '.join(names)} ({'quick' if not args.full else 'full'}) "
          f"through {report.NOTEBOOK.name}...", flush=True)
    try:
        papermill.execute_notebook(
            str(report.NOTEBOOK), str(executed), cwd=str(report.NOTEBOOK.parent),
            parameters={"benchmarks": ",".join(names), "quick": not args.full,
                        "run": not args.committed, "out": str(out)},
            kernel_name="python3", progress_bar=False,
            stdout_file=sys.stdout, stderr_file=sys.stderr)  # each benchmark's line, as it ends
    except papermill.PapermillExecutionError as e:
        raise WorkbenchError(f"the report notebook failed: {e.ename}: {e.evalue}",
                             f"The executed notebook is at {executed}.") from None
    print(f"report: {out}")
    print(f"executed notebook: {executed}")
    failed = [line for line in _outputs(executed) if line.startswith("failed:")]
    if failed:
        raise WorkbenchError(f"some benchmarks {failed[-1]}",
                             f"Their logs are in the report and in {executed}.")


def _outputs(notebook: "os.PathLike[str] | str") -> list[str]:
    import json

    with open(notebook, encoding="utf-8") as f:
        nb = json.load(f)
    lines: list[str] = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                text = o.get("text", "")
                lines.extend(("".join(text) if isinstance(text, list) else text).splitlines())
    return lines


def _deploy(args: argparse.Namespace) -> None:
    from pathlib import Path

    if args.check:
        from .serve.check import check

        check(Path(args.check))
        return
    if not args.output:
        raise WorkbenchError("--output is required", "For example: --output ./ai-service")
    if args.update:
        from .api import resolve_model
        from .config import given
        from .replicas.update import check_update_flags, update

        check_update_flags(given(args, DeployConfig))
        done = update(args.output, resolve_model(args.update), args.ray)
        print(f"workbench: {done['replicas']} replicas serve {done['model']} (sha256 "
              f"{done['sha256'][:12]}…) after {done['seconds']:.1f} s")
        return
    from . import api
    from .config import build, given

    print(repr(api.deploy(**build(DeployConfig, given(args, DeployConfig)).deploy_arguments())))


def _eval(args: argparse.Namespace) -> None:
    from .api import eval_tasks
    from .config import given

    result = eval_tasks(args.model or "default", **given(args, EvalConfig),
                        **given(args, LoadConfig))
    print(repr(result))


def _serve(args: argparse.Namespace) -> None:
    from .serve.run import serve

    serve(args.folder, host=args.host, port=args.port, api_key=args.api_key)


def _rpc_worker(args: argparse.Namespace) -> None:
    from .cluster.rpc_worker import run

    run(host=args.host, port=args.port, device=args.device, mem_limit_gib=args.mem_limit,
        threads=args.threads, allow_network=args.allow_unauthenticated_network,
        status_page=not args.no_status, cache_dir=args.cache_dir)


def rpc_worker_arguments(w: argparse.ArgumentParser) -> None:
    w.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only)")
    w.add_argument("--port", type=int, default=50052)
    w.add_argument("--device", default="cpu", help="cpu or gpu")
    w.add_argument("--mem-limit", type=float, default=None, metavar="GiB",
                   help="most memory the cluster may use here (default: all free memory)")
    w.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores)")
    w.add_argument("--allow-unauthenticated-network", action="store_true",
                   help="listen beyond loopback: llama.cpp's RPC has no authentication, so "
                        "only on a trusted network")
    w.add_argument("--no-status", action="store_true",
                   help="serve only the RPC port, like llama.cpp's rpc-server")
    w.add_argument("--cache-dir", default=None,
                   help="where large tensors are cached by hash (default: "
                        "$WORKBENCH_HOME/rpc-cache)")


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
    d = sub.add_parser("deploy", help="write a tuned, OpenAI-compatible service folder")
    add_flags(d, DeployConfig)
    d.set_defaults(func=_deploy)
    ev = sub.add_parser("eval", help="task accuracy with lm-evaluation-harness through the "
                        "engine (results and provenance as JSON)")
    ev.add_argument("model", nargs="?", default=None,
                    help="a GGUF path or model name (default: the default model)")
    add_flags(ev, EvalConfig)
    add_flags(ev, LoadConfig)
    ev.set_defaults(func=_eval)
    sv = sub.add_parser("serve", help="run a service folder written by deploy")
    sv.add_argument("folder")
    sv.add_argument("--host", default=None, help="default: the folder's service.json")
    sv.add_argument("--port", type=int, default=None)
    sv.add_argument("--api-key", default=None,
                    help="required to listen beyond loopback (or set WORKBENCH_API_KEY)")
    sv.set_defaults(func=_serve)
    w = sub.add_parser("rpc-worker", help="serve this machine's compute to a cluster over "
                       "llama.cpp's RPC protocol")
    rpc_worker_arguments(w)
    w.set_defaults(func=_rpc_worker)
    r = sub.add_parser("report", help="run benchmarks and write a self-contained HTML report")
    r.add_argument("--benchmarks", default="engine_overhead,kv_cache,placement",
                   help="comma-separated names from benchmarks/ (default: %(default)s)")
    r.add_argument("--full", action="store_true",
                   help="the benchmarks' full runs (default: their --quick mode)")
    r.add_argument("--committed", action="store_true",
                   help="report the committed results in benchmarks/results/ without running")
    r.add_argument("--out", default="benchmark-report.html", help="the HTML file to write")
    r.add_argument("--notebook", default=None,
                   help="where to keep the executed notebook (default: a temporary folder)")
    r.set_defaults(func=_report)
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
