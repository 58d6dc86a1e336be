"""Naming coded concepts in plugin parameters: a SNOMED CT name from pydicom's code dictionary."""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code


def sct(name: str) -> Code:
    """``codes.SCT.<name>``, e.g. "Bone", "Lung", "Tissue"; a ValueError says how to find names."""
    try:
        code: Code = getattr(codes.SCT, name)
        return code
    except AttributeError:
        raise ValueError(
            f"{name!r} is not a SNOMED CT concept name in pydicom's dictionary (e.g. Bone, Lung, "
            "Tissue, Organ; see pydicom.sr.codedict.codes.SCT.dir())"
        ) from None
