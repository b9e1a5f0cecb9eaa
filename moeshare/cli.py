"""`moeshare` command line: one subcommand per job; errors a person can fix print as one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from moeshare.errors import MoeshareError

Command = Callable[[argparse.Namespace], int]


def _cmd_zoo(args: argparse.Namespace) -> int:
    from moeshare import zoo

    argv = ["--size", args.size, "--arch", args.arch, "--device", args.device, "--seed", str(args.seed)]
    argv += (["--out", args.out] if args.out else []) + (["--force"] if args.force else [])
    return zoo.main(argv)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from moeshare.checkpoint import open_checkpoint

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
    print(f"{summary['path']}: {summary['architecture']}, {summary['tensors']} tensors in {len(summary['files'])} file(s)")
    print(f"  MoE layers: {len(summary['moe_layers'])} x {summary['experts_per_layer']} experts")
    for kind, n in summary["bytes"].items():
        print(f"  {kind:>7}: {n / 2**20:10.2f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("zoo", help="build (or reuse) the zoo of small trained MoE variants and print its report")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny")
    p.add_argument("--arch", choices=["mixtral", "switch", "all"], default="all")
    p.add_argument("--out", help="zoo directory (default: ~/.cache/moeshare/zoo/<size>)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching zoo is cached")
    p.set_defaults(run=_cmd_zoo)

    p = sub.add_parser("inspect", help="describe a checkpoint directory: architecture, MoE layers, bytes by kind")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
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
