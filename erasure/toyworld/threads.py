"""Thread choreography of the toy-world build: the main process's torch thread count as a function of the stage and
step alone (see :class:`Threads`), so that builds are bit-identical whatever the helper process's progress."""

from __future__ import annotations

import time
from pathlib import Path

import torch


class Threads:
    """Torch threads of the main process, a function of the stage and step alone. The helper process trains CLIP,
    waits for the VAE, then trains the judge, on one thread. The main process runs the first ``clip_wait_step`` VAE
    steps on one thread, waits for CLIP, runs the rest of the VAE on ``cfg.threads``, then the text-encoder
    pretraining and the first ``helper_steps`` joint UNet steps on one thread beside the judge, waits for the
    helper, and runs the rest on ``cfg.threads``. CPU kernels round differently with different thread counts, so a
    schedule that followed the helper's progress would make every build differ; this one makes a build bit-identical
    to any other with the same ``--threads`` (resumed, or with ``--jobs 1``)."""

    def __init__(self, full: int, helper=None, clip_file: Path | None = None):
        self.full, self.helper, self.clip_file = full, helper, clip_file
        self.one()

    def after_clip(self) -> None:
        """Wait until the helper has written CLIP (it then waits for the VAE), then use every thread."""
        while self.helper is not None and not self.clip_file.exists():
            self.check()
            time.sleep(0.5)
        torch.set_num_threads(self.full)

    def one(self) -> None:
        torch.set_num_threads(1)
        self.check()

    def all(self) -> None:
        """Wait for the helper process (re-raising its error), then use every thread."""
        if self.helper is not None:
            self.helper.wait()
            self.check()
            self.helper = None
        torch.set_num_threads(self.full)

    def check(self) -> None:
        """Raise the helper's error now rather than after the UNet stages."""
        if self.helper is not None and self.helper.ready() and not self.helper.successful():
            self.helper.get()
