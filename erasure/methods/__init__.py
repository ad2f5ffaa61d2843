"""The erasure methods, by their ``--method`` name. Adding a method: one file in this folder (a
:class:`erasure.methods.base.Method` subclass with its config dataclass) and one entry here."""

from erasure.methods.esd import ESD
from erasure.methods.rece import RECE
from erasure.methods.salun import SalUn
from erasure.methods.sfd import SFD
from erasure.methods.spm import SPM
from erasure.methods.uce import UCE

METHODS = {m.name: m for m in (SPM, ESD, SalUn, SFD, UCE, RECE)}

__all__ = ["METHODS", "ESD", "SPM", "SalUn", "SFD", "UCE", "RECE"]
