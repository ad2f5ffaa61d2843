"""Training: erase a concept from a text-to-image model.

    import erasure
    result = erasure.erase("circle", method="spm")       # → result.artifact, result.record
    plan = erasure.resolve("nudity", method="esd")        # the resolved configuration, no model loaded

``erasure.toyworld`` (the embedded toy world) is the project's bottom layer: importing it must not load the layers
above it, so ``erase`` and ``resolve`` are imported on first use (PEP 562).
"""

__all__ = ["erase", "resolve"]


def __getattr__(name: str):
    if name in __all__:
        from erasure import api  # lazy: keeps `import erasure.toyworld` free of the layers above it

        return getattr(api, name)
    raise AttributeError(f"module 'erasure' has no attribute {name!r}")
