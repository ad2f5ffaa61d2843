"""The library entry point: ``erasure.erase(concept, method=..., model=..., output=..., **options)``.

    result = erasure.erase("circle", method="esd", steps=50)       # the toy world, minutes on a CPU
    result.artifact                                                 # Path of the .safetensors (or SFD's folder)
    result.record["loss"]                                           # the run record, also written beside it

``erasure.resolve(...)`` takes the same arguments and returns the resolved :class:`erasure.engine.Plan` without
loading a model (what ``--dry-run`` prints). ``python -m erasure.train`` and ``eval.sweep`` call these two.
"""

from __future__ import annotations

from erasure.engine import Plan, Result, execute, plan


def resolve(concept: str, method: str = "spm", **options) -> Plan:
    """Resolve ``concept``, ``method`` and ``options`` into a :class:`~erasure.engine.Plan` without loading a model.

    ``options`` are the run's — ``model`` ('toy', a local diffusers folder or a cached hub id), ``output``,
    ``prompts`` (a list, or '|'-separated), ``seed``, ``steps``, ``lr``, ``batch_size`` (those three only for
    methods that train; UCE and RECE solve in closed form), ``mask``, the memory levers ``mixed_precision``,
    ``gradient_checkpointing``, ``optimizer``, ``use_8bit_adam``, ``allow_tf32``, ``fsdp`` (under
    ``accelerate launch``), ``device``, ``attention``, ``checkpoint_every``, ``resume``, ``quiet`` — and the
    method's own (``python -m erasure.train --method NAME --help`` lists them with their defaults). Unknown options,
    bad values and bad combinations raise :class:`adapters.errors.UserError` with one line.
    """
    return plan(concept, method, options)


def erase(concept: str, method: str = "spm", **options) -> Result:
    """Erase ``concept`` with ``method`` and write its artifact and run record → :class:`~erasure.engine.Result`
    (``.artifact``, ``.record``). See :func:`resolve` for ``options``."""
    return execute(resolve(concept, method, **options))
