"""`moeshare` command line: one subcommand per job; errors a person can fix print as one line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from moeshare.errors import MoeshareError

Command = Callable[[argparse.Namespace], int]


def _cmd_zoo(args: argparse.Namespace) -> int:
    from moeshare import zoo

    argv = ["--size", args.size, "--arch", args.arch, "--device", args.device, "--seed", str(args.seed)]
    argv += (["--out", args.out] if args.out else []) + (["--force"] if args.force else [])
    return zoo.main(argv)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so the cleanup that Ctrl-C gets runs for it too."""


def _terminable(run: Command) -> Command:
    """A command that writes files: SIGTERM removes what it wrote so far, like Ctrl-C, and exits 143."""

    def wrapped(args: argparse.Namespace) -> int:
        import signal

        def terminate(signum: int, frame: object) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
            raise _Terminated

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            return run(args)
        except _Terminated:
            print(f"moeshare: terminated; {args.out} was not written", file=sys.stderr)
            return 128 + signal.SIGTERM
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapped


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from moeshare.consolidate import Options, consolidate, format_report, summarize

    opts = Options(args.budget, args.threshold, args.similarity, args.merge, args.calib, args.force)
    opts.force_merge = args.force_merge
    if args.self_calib is not None:
        opts.self_calib = args.self_calib
    manifest = consolidate(args.variants, args.out, opts)
    print(format_report(summarize(manifest)))
    print(f"wrote {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from moeshare.consolidate import export_variant

    out = export_variant(args.store, args.variant, args.out, force=args.force)
    print(f"wrote {out}")
    return 0


def _grpc_errors(run: Command) -> Command:
    """A refused call prints its status and the server's message as one line (exit 2), never a traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        import grpc

        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise MoeshareError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
        try:
            return run(args)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise MoeshareError(
                    f"DEADLINE_EXCEEDED: no answer from {args.address} within --timeout {args.timeout:g} s"
                ) from None
            raise MoeshareError(f"{e.code().name}: {e.details()}") from None

    return wrapped


def _client(args: argparse.Namespace):
    from moeshare.client import Client, read_token

    try:
        token = read_token(args.token_file)
    except OSError as e:
        raise MoeshareError(f"--token-file {args.token_file}: cannot read it ({e.strerror})") from None
    return Client(args.address, token=token)


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise MoeshareError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if not 1 <= args.max_tokens < 2**31:
        raise MoeshareError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.top_k < 2**31:
        raise MoeshareError(f"--top-k must be >= 0 (0 turns it off), got {args.top_k}")
    params = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    t0 = time.perf_counter()
    with _client(args) as client:
        last = None
        for r in client.generate_stream(args.model, args.prompt, timeout=args.timeout, **params):
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            last = r
    sys.stdout.write("\n")
    if last is not None:
        from moeshare.client import FINISH

        u = last.usage
        print(
            f"[{args.model}: {u.completion_tokens} tokens, {FINISH.get(last.finish_reason, '?')}, "
            f"ttft {u.ttft_seconds * 1e3:.0f} ms, {time.perf_counter() - t0:.2f} s]",
            file=sys.stderr,
        )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models(timeout=args.timeout)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": m.name,
                        "store": m.store,
                        "architecture": m.architecture,
                        "kind": m.kind,
                        "context_length": m.context_length,
                        "resident": m.resident,
                        "max_batched_tokens": m.max_batched_tokens,
                        "max_num_seqs": m.max_num_seqs,
                    }
                    for m in models
                ],
                indent=2,
            )
        )
        return 0
    for m in models:
        print(
            f"{m.name:<20} {m.architecture:<8} {m.kind:<8} ctx {m.context_length:<6} "
            f"{'resident' if m.resident else 'host':<9} step {m.max_batched_tokens:>5} tok/{m.max_num_seqs:<3} seq "
            f"{m.store}" + ("  (text-to-text: the prompt is the encoder's input)" if m.text_to_text else "")
        )
    return 0


def _inspect_store(args: argparse.Namespace) -> int:
    from moeshare.consolidate import format_report, summarize
    from moeshare.store import Store

    store = Store(args.path)  # checks that every file is there and whole
    summary = summarize(store.manifest.raw)
    if args.verify:
        summary["verified_files"] = store.verify()
    print(json.dumps(summary, indent=2) if args.json else format_report(summary))
    if args.verify and not args.json:
        print(f"verified: the sha256 of all {summary['verified_files']} files match the manifest")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from moeshare.checkpoint import open_checkpoint
    from moeshare.store import is_store

    if is_store(args.path):
        return _inspect_store(args)
    if args.verify:
        raise MoeshareError(f"{args.path}: --verify checks a store (it records sha256s); this is not one")

    with open_checkpoint(args.path) as ckpt:
        kinds: dict[str, int] = {}
        for name in ckpt.names:
            kind = ckpt.adapter.classify(name).kind
            kinds[kind] = kinds.get(kind, 0) + ckpt.nbytes(name)
        summary = {
            "path": str(ckpt.path),
            "architecture": ckpt.adapter.name,
            "files": [f.name for f in ckpt.files],
            "tensors": len(ckpt.names),
            "moe_layers": ckpt.adapter.moe_layers,
            "experts_per_layer": ckpt.adapter.num_experts,
            "bytes": {"total": sum(kinds.values()), **kinds},
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['path']}: {summary['architecture']}, {summary['tensors']} tensors in {len(summary['files'])} file(s)"
    )
    print(f"  MoE layers: {len(summary['moe_layers'])} x {summary['experts_per_layer']} experts")
    for kind, n in summary["bytes"].items():
        print(f"  {kind:>7}: {n / 2**20:10.2f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "zoo", help="build (or reuse) the zoo of small trained MoE variants and print its report"
    )
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--arch", choices=["mixtral", "switch", "all"], default="all")
    p.add_argument("--out", help="zoo directory (default: ~/.cache/moeshare/zoo/<size>)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching zoo is cached")
    p.set_defaults(run=_cmd_zoo)

    p = sub.add_parser("consolidate", help="cluster the experts of fine-tuned MoE variants into one store")
    p.add_argument(
        "variants", nargs="+", help="HF checkpoint directories of one base; each is named after its directory"
    )
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument(
        "--budget", help="bank size: a fraction of the experts (0.5) or bytes (40GiB); default 1.0"
    )
    p.add_argument(
        "--threshold", type=float, help="instead of a budget: merge experts closer than this distance"
    )
    p.add_argument(
        "--similarity", choices=["weight", "output"], help="default: output with --calib, else weight"
    )
    p.add_argument(
        "--merge",
        choices=["average", "frequency", "medoid", "fit"],
        help="fit: each shared expert fitted to its members' outputs on calibration tokens; "
        "default: fit with --calib or self-calibration, else average",
    )
    p.add_argument(
        "--calib", type=Path, help="calibration text file (enables output similarity, frequency merge)"
    )
    p.add_argument(
        "--self-calib",
        type=int,
        metavar="TOKENS",
        help="without --calib, tokens each causal (Mixtral) variant samples from itself to calibrate the fit "
        "merge (default 4096; 0: none, so the merge defaults to average)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a store (or an empty directory) at --out; anything else is refused",
    )
    p.add_argument(
        "--force-merge",
        action="store_true",
        help="share the experts of a variant that is far from all others (refused by default: probably "
        "not a fine-tune of the same base)",
    )
    p.set_defaults(run=_terminable(_cmd_consolidate))

    p = sub.add_parser("export", help="write one variant of a store as an ordinary HF checkpoint")
    p.add_argument("store")
    p.add_argument("--variant", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a checkpoint moeshare exported (or an empty directory) at --out; anything else is refused",
    )
    p.set_defaults(run=_terminable(_cmd_export))

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default="127.0.0.1:50051", help="the server (default 127.0.0.1:50051)")
        p.add_argument("--token-file", help="file holding the server's bearer token")

    p = sub.add_parser("generate", help="stream a completion from a running server to stdout")
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="variant name (see moeshare models)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds the whole completion may take (default 300)"
    )
    client_args(p)
    p.set_defaults(run=_grpc_errors(_cmd_generate))

    p = sub.add_parser("models", help="list the models a running server serves")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    client_args(p)
    p.set_defaults(run=_grpc_errors(_cmd_models))

    from moeshare.server.command import add_serve_parser

    add_serve_parser(sub)

    from moeshare.evals.command import add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("inspect", help="describe a store (bank, errors, sizes) or a checkpoint directory")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--verify", action="store_true", help="also check each store file's sha256 against the manifest"
    )
    p.set_defaults(run=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MoeshareError as e:
        print(f"moeshare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeshare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
