"""Which transfer syntaxes to propose for what is queued, and how each instance goes out.

Three cases, in the order they are preferred:

* the destination takes the syntax the file is stored in (and no other is
  asked for): the file is streamed from disk untouched;
* the destination asks for lossless JPEG 2000 or RLE and accepts it: the
  pixel data is re-encoded (decoded first if stored compressed);
* otherwise the instance is decoded to an uncompressed syntax the destination
  accepts.

Every change is lossless, so the instance keeps its SOP Instance UID (a
lossy source decoded is the same lossy image, flagged as it was).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

log = logging.getLogger(__name__)

#: The destination's ``transfer_syntax`` setting as a syntax to re-encode to (None: as stored).
PREFERRED = {"as-stored": None, "none": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless, "rle": RLELossless}
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class TranscodeError(Exception):
    """The instance cannot be put into any syntax the destination accepted."""


def proposals(
    kinds: set[tuple[str, str]], preferred: str, allowed: tuple[str, ...] = ()
) -> dict[str, list[tuple[str, ...]]]:
    """Presentation contexts to propose: {SOP class: [transfer syntaxes of one context, ...]}.

    Per stored kind: the preferred syntax (if re-encoding is asked for), the stored one, and
    the uncompressed ones as the fallback a decoder can always produce.
    """
    want = PREFERRED[preferred]
    out: dict[str, list[tuple[str, ...]]] = {}
    for sop_class, stored in sorted(kinds):
        groups = out.setdefault(sop_class, [])
        candidates: list[tuple[str, ...]] = []
        if want is not None and want not in UNCOMPRESSED and want != stored:
            candidates.append((want,))
        if want is None or want not in UNCOMPRESSED or UID(stored) in UNCOMPRESSED or not UID(stored).is_compressed:
            candidates.append((stored,))
        candidates.append(tuple(ts for ts in UNCOMPRESSED if ts != stored))
        for group in candidates:
            group = tuple(ts for ts in group if not allowed or ts in allowed)
            if group and group not in groups:
                groups.append(group)
    return {k: v for k, v in out.items() if v}


def _decoded(path: Path, stored: UID) -> Dataset:
    ds = dcmread(path)
    if stored.is_compressed and "PixelData" in ds:
        # Same instance, same UID: lossless decoding does not make a new object.
        ds.decompress(generate_instance_uid=False)
    return ds


def prepare(
    path: Path, sop_class: str, stored_ts: str, accepted: set[tuple[str, str]], preferred: str = "as-stored"
) -> tuple[Path | Dataset, str]:
    """What to hand to C-STORE for this file, and the syntax it goes out in."""
    stored = UID(stored_ts)
    want = PREFERRED[preferred]
    if want is not None and want not in UNCOMPRESSED and want != stored and (sop_class, want) in accepted:
        try:
            ds = _decoded(path, stored)
            if "PixelData" in ds:
                ds.compress(want, generate_instance_uid=False)
                return ds, str(want)
        except Exception as e:  # e.g. a photometric or bit depth the encoder refuses: fall back below
            log.info(
                "%s: cannot re-encode to %s (%s); sending it %s",
                path.name,
                want.name,
                e,
                "as stored" if (sop_class, stored_ts) in accepted else "uncompressed",
            )
    as_is = (sop_class, stored_ts) in accepted
    if as_is and not (want in UNCOMPRESSED and stored.is_compressed):
        return path, stored_ts
    target = next((ts for ts in UNCOMPRESSED if (sop_class, ts) in accepted), None)
    if target is None:
        if as_is:
            return path, stored_ts
        raise TranscodeError(
            f"{path.name}: the destination accepted neither {stored.name} nor an uncompressed syntax for "
            f"{UID(sop_class).name}"
        )
    try:
        ds = _decoded(path, stored)
    except Exception as e:
        raise TranscodeError(f"{path.name}: cannot decode {stored.name} to send it uncompressed: {e}") from None
    if stored.is_compressed:
        why = "its transfer_syntax asks for uncompressed" if as_is else f"the destination did not accept {stored.name}"
        log.info("%s: sent decompressed (%s -> %s): %s", path.name, stored.name, target.name, why)
    # pynetdicom encodes the data set in the accepted context's syntax (explicit or implicit VR).
    return ds, str(target)
