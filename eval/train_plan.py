"""TEMPORARY bridge, to be deleted when ``erasure.resolve`` / ``erasure.erase`` land on main: the sweep's training
options (``erasure.erase`` keyword options) run through today's ``erasure.train`` (which only takes CLI lists)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import erasure.train as et
from adapters.errors import UserError


def _argv(options: dict) -> list[str]:
    argv = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False and v is not None:
            argv += [flag, str(v)]
    return argv


def plan_training(options: dict):
    def error(msg):
        raise UserError(msg)

    parser = et.build_parser()
    parser.error = error
    parser.parse_args(_argv(options))
    out = "x" if options.get("method", "spm") in et.FOLDER_METHODS else "x.safetensors"
    run, concept, mcfg = et.resolve(_argv({**options, "output": out}))
    return SimpleNamespace(run=run, concept=concept, config=mcfg, output=Path(run.output),
                           folder=run.method in et.FOLDER_METHODS)


def erase(options: dict, output):
    run, concept, mcfg = et.resolve(_argv({**options, "output": str(output), "resume": True, "quiet": True}))
    return SimpleNamespace(artifact=Path(output), record=et.train(run, concept, mcfg))
