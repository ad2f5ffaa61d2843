"""Plug-in modules on a UNet (membranes, saliency masks) and the artifact files that carry them."""

from adapters.errors import UserError

__all__ = ["UserError"]
