"""The ``xllm-port`` command: apply | verify | rollback | recover | status | flags | demo | bench.

Exit codes: 0 success, 1 a step failed its checks or was interrupted (the target was restored),
2 bad usage or bad input. Every command takes ``--json``; errors then also go to stdout as JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from .. import flags
from ..paths import SERIES_DIR
from . import driver
from .errors import PortError, UsageError
from .target import BRANCH
from .transaction import Interrupted, interruptible, signal_name

BENCH_OPS = ("logit_softmax", "topk", "sampling", "beam_search")  # xllm_sampling.bench.OPS, without importing torch
BENCH_ALL_OPS = BENCH_OPS + ("topk_unsorted", "topk1024", "topk1024_unsorted", "sampling_greedy", "sampling_plain",
                             "sampling_top_p", "sampling_min_p", "sampling_penalties", "beam_search_w1",
                             "beam_search_w8")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="xllm-port", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    targeted = argparse.ArgumentParser(add_help=False, parents=[common])
    targeted.add_argument("--target", required=True, type=Path, help="the target git repository")
    targeted.add_argument("--series", type=Path, default=SERIES_DIR, help="the series folder (default: the shipped one)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("apply", parents=[targeted], help="apply, verify and commit steps in order")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", help="apply only this step")
    which.add_argument("--all", action="store_true", help="every step not yet applied (the default)")
    p.add_argument("--dry-run", action="store_true", help="check that the patches apply; change nothing")
    p.add_argument("--branch", default=BRANCH, help=f"the branch the target must be on (default {BRANCH})")

    p = sub.add_parser("verify", parents=[targeted], help="re-run parity tests and gates of applied steps")
    p.add_argument("--step")

    p = sub.add_parser("rollback", parents=[targeted], help="roll a step back by flag or by revert")
    p.add_argument("--step", required=True)
    p.add_argument("--mode", choices=("flag", "revert"), default="flag")
    p.add_argument("--cascade", action="store_true", help="also revert applied steps that depend on it, newest first")
    p.add_argument("--branch", default=BRANCH)

    sub.add_parser("recover", parents=[targeted],
                   help="finish restoring a step that an interrupted or killed run left half applied")
    sub.add_parser("status", parents=[targeted], help="each step's state in the target")

    p = sub.add_parser("flags", parents=[common], help="list, get or set runtime flags")
    p.add_argument("action", nargs="?", choices=("list", "get", "set"), default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("value", nargs="?")
    p.add_argument("--target", type=Path, help="use the target's flags file (.git/xllm_port/flags.toml)")

    p = sub.add_parser("bench", parents=[common], help="time each op: torch, fast path, FlashInfer")
    p.add_argument("--ops", nargs="+", choices=BENCH_ALL_OPS + ("spec_decode",), default=list(BENCH_OPS),
                   help="default: the four ops (topk: k = 50 sorted; beam_search: 4 beams, --batch counts requests); "
                        "also topk_unsorted, topk1024, topk1024_unsorted, the sampling_* configurations, beam_search_w1, "
                        "beam_search_w8; spec_decode alone is --spec")
    p.add_argument("--batch", nargs="+", type=int, help="default: 1 16 64 256 on a GPU, 1 16 on CPU")
    p.add_argument("--vocab", nargs="+", type=int, help="default: 32000 128256 151936 on a GPU, 32000 on CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--plot", type=Path, help="write a PNG: time against batch per implementation")
    p.add_argument("--decode", action="store_true",
                   help="end to end instead: the reference engine's decode loop (TTFT, prefill, TPOT, total, tokens/s, peak "
                        "memory, the sampling step's share) with the steps switched on one more at a time; "
                        "--batch default 1 16 64, --vocab its first value (default 151936 on a GPU, 32000 on CPU)")
    p.add_argument("--preset", choices=("tiny", "0.5b"), default="tiny",
                   help="--decode / --beam: the reference model's size (0.5b: 24 layers, width 896, 14 query heads on 2 "
                        "key/value heads, vocab 151936, random weights); --vocab overrides its vocabulary")
    p.add_argument("--spec", action="store_true",
                   help="speculative decoding's rejection sampler instead: each level (--levels) against K (--k), "
                        "us per call host included and kernel launches; --batch default 1 16 64 (1 4 on CPU), --vocab "
                        "its first value; --plot draws time against K")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 4, 8],
                   help="--spec / --speculative: draft tokens per request")
    p.add_argument("--levels", nargs="+", choices=("loop", "compiled", "kernel", "flashinfer"),
                   default=["loop", "compiled", "kernel", "flashinfer"], help="--spec: the levels timed")
    p.add_argument("--host", action="store_true",
                   help="the host's share instead: each op's fast path (and FlashInfer's call) called back to back, "
                        "device against wall microseconds per call; --batch default 1, --vocab its first value")
    p.add_argument("--beam", action="store_true",
                   help="end to end instead: the reference engine's whole beam search (4 beams), flag beam_search on "
                        "against off, in tokens/s; --batch default 1 16 64, --vocab as for --decode")
    p.add_argument("--speculative", action="store_true",
                   help="end to end instead: the reference engine's speculative mode (a one-block draft, each --k) "
                        "against plain decoding, flag spec_decode on and off, tokens/s and the share of drafts "
                        "accepted; --batch default 1, --vocab as for --decode")

    p = sub.add_parser("demo", parents=[common], help="create the reference engine and apply the whole series")
    p.add_argument("--dir", type=Path, help="where to create the target (default: a new temporary folder)")
    return ap


def _progress(args):
    return (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))


def _print_reports(reports) -> None:
    for r in reports:
        line = f"{r.step:14} {r.status:16} {(r.commit or '')[:10]:10}"
        if r.gate.get("gate"):
            g = r.gate["gate"]
            line += f" gate {g['device']} {g['ratio']:.3f} < {g['threshold']}"
        elif r.gate:
            line += f" gate {r.gate['result']}"
        print(line + (f"  {r.message}" if r.message else ""))


def _flags_file(args) -> Path | None:
    if args.target is None:
        import os

        path = os.environ.get(flags.FLAGS_FILE_ENV)
        return Path(path) if path else None
    from . import target

    with target.open_repo(args.target) as repo:
        return target.flags_file(repo)


def _flags(args) -> object:
    path = _flags_file(args)
    file_values, problems = flags.read_file_lenient(path) if path and path.exists() else ({}, [])
    for problem in problems:
        print(f"xllm-port: warning: {path}: {problem}" + (" (dropped: this command rewrites the file)"
                                                          if args.action == "set" else ""), file=sys.stderr)
    if args.action == "list":
        rows = []
        for name, d in flags.DEFINITIONS.items():
            value, source = (file_values[name], f"file:{path}") if name in file_values else flags.lookup(name)
            rows.append({"name": name, "value": value, "source": source, "type": d.type, "default": d.default,
                         "env": [d.env, *d.aliases], "step": d.step, "help": d.help})
        return rows
    if not args.name:
        raise UsageError(f"xllm-port flags {args.action}: a flag name is required")
    flags.definition(args.name)
    if args.action == "get":
        return {"name": args.name, "value": file_values.get(args.name, flags.get(args.name))}
    if args.value is None:
        raise UsageError("xllm-port flags set: a value is required")
    if path is None:
        raise UsageError(f"xllm-port flags set: give --target DIR or set {flags.FLAGS_FILE_ENV}")
    value = flags.parse(args.name, args.value)
    flags.set_in_file(path, args.name, value)
    return {"name": args.name, "value": value, "file": str(path)}


def _demo(args, progress) -> tuple[object, int]:
    from . import demo

    start = time.perf_counter()
    path = demo.create_target(args.dir)
    progress(f"reference engine created at {path} (branch {BRANCH})")
    try:
        reports = driver.apply(path, SERIES_DIR, None, False, BRANCH, progress)
        code = 0
    except PortError as e:
        reports, code = getattr(e, "reports", []), e.exit_code
        progress(f"error: {e}")
    return {"target": str(path), "seconds": round(time.perf_counter() - start, 1),
            "steps": [asdict(r) for r in reports]}, code


def _bench(args, progress) -> dict:
    import torch

    from .. import bench, gate

    gpu = gate.device_kind() == "cuda"
    if "spec_decode" in args.ops:
        if len(args.ops) > 1:
            raise UsageError("--ops: spec_decode goes alone (timed against K, as --spec: the same bench)")
        args.spec = True
    if (args.spec or args.speculative) and any(k < 1 for k in args.k):
        raise UsageError("--k: draft tokens per request must be >= 1")
    if args.spec:
        from .. import bench_spec

        vocab = (args.vocab or [151936 if gpu else 32000])[0]
        report = bench_spec.run(args.k, args.batch or ([1, 16, 64] if gpu else [1, 4]), vocab, min(args.reps, 20),
                                args.levels, progress)
        return _plotted(bench_spec.plot, report, args.plot, progress)
    if args.host:
        vocab = (args.vocab or [151936 if gpu else 32000])[0]
        return bench.host(args.ops, args.batch or [1], vocab, bench.HOST_ROUNDS, progress)
    if args.decode or args.beam or args.speculative:
        from .. import bench_decode

        vocab = (args.vocab or [None if args.preset != "tiny" else 151936 if gpu else 32000])[0]
        if args.speculative:
            return bench_decode.run_speculative(args.batch or [1], vocab, args.k, 3, progress, args.preset)
        batches = args.batch or ([1, 16, 64] if gpu else [1, 16])
        if args.beam:
            return bench_decode.run_beam(batches, vocab, 3 if gpu else 2, progress, args.preset)
        return bench_decode.run(batches, vocab, 3, progress, args.preset)
    batches = args.batch or ([1, 16, 64, 256] if gpu else [1, 16])
    vocabs = args.vocab or ([32000, 128256, 151936] if gpu else [32000])
    report = bench.run(args.ops, batches, vocabs, getattr(torch, args.dtype), args.reps, progress)
    return _plotted(bench.plot, report, args.plot, progress)


def _plotted(plot, report: dict, path, progress) -> dict:
    """``report``, after ``plot(report, path)`` drew it when a --plot path was given."""
    if path:
        try:
            plot(report, str(path))
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'xllm-sampling[plot]'") from None
        progress(f"plot written to {path}")
    return report


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    try:
        args = _parser().parse_args(argv)
        progress = _progress(args)
        code = 0
        with interruptible():
            if args.command == "apply":
                result = driver.apply(args.target, args.series, args.step, args.dry_run, args.branch, progress)
            elif args.command == "verify":
                result = driver.verify(args.target, args.series, args.step, progress)
            elif args.command == "rollback":
                result = driver.rollback(args.target, args.series, args.step, args.mode, args.cascade, args.branch,
                                         progress)
            elif args.command == "recover":
                result = driver.recover(args.target, progress)
            elif args.command == "status":
                result = driver.status(args.target, args.series)
            elif args.command == "flags":
                result = _flags(args)
            elif args.command == "bench":
                result = _bench(args, progress)
            else:
                result, code = _demo(args, progress)
    except PortError as e:
        return _error(str(e), e.exit_code, as_json, getattr(e, "reports", None))
    except ValueError as e:  # unknown flag names and bad flag values
        return _error(str(e), 2, as_json)
    except (KeyboardInterrupt, Interrupted) as e:
        return _error(f"interrupted by {signal_name(e)}; nothing was left half done", 1, as_json)
    _output(args, result)
    return code


def _error(message: str, code: int, as_json: bool, reports=None) -> int:
    """One line on stderr; with ``--json`` also a JSON object on stdout."""
    print(f"xllm-port: error: {message}", file=sys.stderr)
    if as_json:
        data = {"error": message, "exit_code": code}
        if reports:
            data["steps"] = [asdict(r) for r in reports]
        print(json.dumps(data, indent=2, default=str))
    return code


def _output(args, result) -> None:
    if args.json:
        data = [asdict(r) for r in result] if isinstance(result, list) and result and hasattr(result[0], "step") and not isinstance(result[0], dict) else result
        print(json.dumps(data, indent=2, default=str))
    elif args.command in ("apply", "verify", "rollback", "recover"):
        _print_reports(result)
    elif args.command == "status":
        for row in result:
            last = row["last_verification"]
            gate = last.get("gate", {})
            verified = f"{last['result']} at {last['time']}" if last else "never verified"
            ratio = f", gate {gate['device']} {gate['ratio']:.3f}" if "ratio" in gate else ""
            print(f"{row['step']:14} {'applied' if row['applied'] else 'not applied':12} {(row['commit'] or '-')[:10]:10} "
                  f"{row['flag']}={str(row['flag_value']).lower():6} {verified}{ratio}")
            if row["interrupted"]:
                print(f"{'':14} INTERRUPTED during its {row['interrupted']} phase: run `xllm-port recover "
                      f"--target {args.target}` (or apply, which recovers first)")
            for process in row.get("graph_counters", []):
                when = dt.datetime.fromtimestamp(process["updated"]).isoformat(timespec="seconds")
                state = "running" if process["running"] else "exited"
                for name, c in process["runners"].items():
                    print(f"{'':14} graphs of process {process['pid']} ({state}, {when}): {name}: {c['captures']} "
                          f"captures, {c['replays']} replays, {c['eager_calls']} eager calls")
    elif args.command == "bench":
        from .. import bench, bench_decode, bench_spec

        print(bench_spec.table(result) if "spec" in result else
              bench.host_table(result) if "host" in result else
              bench_decode.table(result) if "decode" in result else
              bench_decode.beam_table(result) if "beam" in result else
              bench_decode.speculative_table(result) if "speculative" in result else bench.table(result))
    elif args.command == "flags":
        rows = result if isinstance(result, list) else [result]
        for row in rows:
            print(f"{row['name']:22} {str(row['value']).lower():6} " + (f"({row['source']})  {row['help']}" if "help" in row else ""))
    else:
        print(f"\n{'step':14} {'status':16} {'commit':10} gate")
        _print_reports([driver.StepReport(**s) for s in result["steps"]])
        print(f"\ntarget: {result['target']}  ({result['seconds']} s)")
        print(f"it stays there for you to inspect (xllm-port status --target {result['target']}); "
              f"remove it with: rm -rf {result['target']}")


def main() -> None:
    """Console entry point."""
    # torch warns at import when NumPy is absent; nothing here uses NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    sys.exit(run())


if __name__ == "__main__":
    main()
