"""``laion-ray`` command line. Each subcommand maps onto one library call.

Heavy modules (ray, torch, open_clip) are imported inside the handlers so that
``laion-ray --help`` and ``laion-ray info`` start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from laion_ray.errors import LaionRayError

Handler = Callable[[argparse.Namespace], int | None]
_COMMANDS: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def command(name: str, *, help: str, example: str):
    """Register ``handler`` as subcommand ``name``; ``configure`` adds its flags."""

    def wrap(configure: Callable[[argparse.ArgumentParser], None]):
        def bind(handler: Handler) -> Handler:
            _COMMANDS.append((name, help, example, configure, handler))
            return handler

        return bind

    return wrap


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise LaionRayError(f"{self.prog}: {message}")


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="object-store option passed to Lance (repeatable); AWS_* env vars are read too",
    )


def _ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray)"
    )


def _storage(args: argparse.Namespace) -> dict[str, str]:
    from laion_ray.storage import parse_storage_options

    return parse_storage_options(args.storage_option)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- sample -----------------------------------------------------------------


@command(
    "sample",
    help="write a LAION-shaped Lance dataset with real JPEGs",
    example="laion-ray sample ./laion.lance --rows 10000 --fragments 8 --bad-fraction 0.01",
)
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="dataset URI to create (must not exist)")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--fragments", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-fraction", type=float, default=0.0, help="share of corrupt images")
    _storage_flags(p)


@_sample_args
def _sample(args: argparse.Namespace) -> None:
    from laion_ray.sample import write_sample

    report = write_sample(
        args.out,
        rows=args.rows,
        fragments=args.fragments,
        seed=args.seed,
        bad_fraction=args.bad_fraction,
        storage_options=_storage(args),
    )
    print(report.summary())


# --- info -------------------------------------------------------------------


@command(
    "info",
    help="show rows, fragments, schema, versions, tags and indices",
    example="laion-ray info ./laion.lance --json",
)
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _storage_flags(p)


@_info_args
def _info(args: argparse.Namespace) -> None:
    from laion_ray.info import dataset_info, format_info

    info = dataset_info(args.uri, storage_options=_storage(args))
    if args.json:
        _print_json(info)
    else:
        print(format_info(info))


# --- more subcommands are registered below this line ------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="laion-ray",
        description="Backfill, re-embed and re-index LAION-style Lance tables on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, example, configure, handler in _COMMANDS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}.\n\nexample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(message)s",
            datefmt="%H:%M:%S",
        )
        return int(args.handler(args) or 0)
    except LaionRayError as exc:
        print(f"laion-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("laion-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
