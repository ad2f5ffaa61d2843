"""``python -m erasure.train``: erase a concept from a text-to-image model and write a ``.safetensors`` artifact.

    python -m erasure.train --concept circle                 # the embedded toy world, a few minutes on 2 cores
    python -m erasure.train --concept nudity --model /path/to/stable-diffusion-v1-4
    python -m erasure.train --concept circle --dry-run       # print the resolved configuration
    python -m erasure.train --concept circle --concept star  # several concepts in one run (or toy-shapes:3)
    python -m erasure.train --method esd --help              # ESD's own options and their defaults

A thin command line over :func:`erasure.erase`: flags → options → artifact (+ a JSON run record beside it).
User errors exit with status 2 and one line; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from typing import Sequence

from adapters.errors import UserError
from erasure.api import erase, resolve
from erasure.config import TrainConfig
from erasure.methods import METHODS
from pipelines.load import quiet_loading

_SHARED = ("steps", "lr", "batch_size")  # run options every method has: with --method, they show its defaults


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UserErrors (exit status 2 through :func:`main`)."""

    def error(self, message: str):
        raise UserError(message)


def _add_field(p, f, method: str = "") -> None:
    flag = "--" + f.name.replace("_", "-")
    meta = dict(f.metadata)
    default = None if f.default is MISSING else f.default
    help_ = meta.get("help", "")
    if f.type in (bool, "bool"):
        p.add_argument(flag, action="store_true", default=None, help=help_)
        return
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    conv = float if "float" in kind else int if "int" in kind else str
    choices = meta.get("choices")
    # a method's choices are checked when its config is resolved (one line naming the method); the run's by argparse
    kw = {"metavar": "{" + ",".join(choices) + "}"} if choices and method else {"choices": choices}
    p.add_argument(flag, type=conv, default=None, help=f"{help_} [default: {default}]" if default is not None else help_,
                   **kw)


def _method_list() -> str:
    lines = [f"  {name:6s} {cls.title}" for name, cls in METHODS.items()]
    return "methods (python -m erasure.train --method NAME --help shows NAME's options):\n" + "\n".join(lines)


DESCRIPTION = """\
Erase a concept from a text-to-image model and write a .safetensors artifact (an SFD student: a pipeline folder)
with a JSON run record beside it. The model is the embedded toy world (the default), a local diffusers folder or a
hub id already in the local cache; nothing is downloaded. --dry-run prints the resolved configuration and trains
nothing; --method NAME --help lists NAME's own options with their paper defaults. Bad input exits with status 2 and
one line; an interrupted run continues from its last checkpoint with --resume."""

EXAMPLES = """\
Examples:
  python -m erasure.train --concept circle                  # SPM (the default) on the toy world
  python -m erasure.train --concept circle --method uce     # a closed-form edit, seconds
  python -m erasure.train --concept circle --dry-run        # print the resolved configuration
  python -m erasure.train --concept circle --concept square --method uce   # several concepts in one run
  python -m erasure.train --method esd --help               # ESD's own options and their defaults
  python -m erasure.train --concept nudity --model /path/to/stable-diffusion-v1-4 --mixed-precision bf16"""


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The parser of the run's options and, with ``method``, that method's own options (one default each)."""
    p = _Parser(prog="python -m erasure.train", description=DESCRIPTION,
                epilog=EXAMPLES if method else _method_list() + "\n\n" + EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    cls = METHODS.get(method) if method else None
    for f in fields(TrainConfig):
        if f.name == "concept":
            p.add_argument("--concept", action="append", default=None,
                           help=f"{f.metadata['help']} [default: {f.default}]")
        elif f.name == "method":
            p.add_argument("--method", choices=list(METHODS), default=None,
                           help=f"erasure method [default: {f.default}]")
        elif not (cls and f.name in _SHARED):
            _add_field(p, f)
    if cls is not None:
        g = p.add_argument_group(f"{method} options", "defaults are the paper's; on the toy world the method's toy "
                                 "defaults apply where you set nothing (--dry-run prints the resolved values)")
        for f in fields(cls.config_class):
            _add_field(g, f, method)
    return p


def parse(argv: Sequence[str] | None = None) -> tuple[str, str, dict, bool]:
    """argv → (concept, method, options, dry_run). argparse errors exit 2 by themselves; an option of another
    method is a UserError naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(add_help=False, prog="python -m erasure.train")
    pre.add_argument("--method", choices=list(METHODS), default=None)
    chosen = pre.parse_known_args(argv)[0].method
    method = chosen or TrainConfig.method
    parser = build_parser(chosen if chosen else None if any(a in ("-h", "--help") for a in argv) else method)
    args, rest = parser.parse_known_args(argv)
    if rest:
        others = {"--" + f.name.replace("_", "-") for cls in METHODS.values() for f in fields(cls.config_class)}
        flag = rest[0].split("=")[0]
        if flag in others:
            raise UserError(f"{flag} is not an option of --method {method}")
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    options = {k: v for k, v in vars(args).items() if v is not None}
    options.pop("method", None)
    dry_run = bool(options.pop("dry_run", False))
    concept = "+".join(options.pop("concept", [TrainConfig.concept]))
    return concept, method, options, dry_run


def main(argv: Sequence[str] | None = None) -> int:
    try:
        concept, method, options, dry_run = parse(argv)
        if options.get("quiet"):
            quiet_loading()
        if dry_run:
            print(json.dumps(resolve(concept, method, **options).describe(), indent=2))
            return 0
        result = erase(concept, method, **options)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    record = result.record
    if not options.get("quiet"):
        print(f"erased '{concept}' with {method} in {record['seconds']} s → {record['artifact']}")
        if "mask" in record:
            m = record["mask"]
            size = f", {m['bytes_on_disk'] / 2**20:.1f} MiB" if "bytes_on_disk" in m else ""
            print(f"saliency mask: keeps {100 * m['kept_fraction']:.1f} % of {m['parameters']:,} weights{size} "
                  f"→ {m['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
