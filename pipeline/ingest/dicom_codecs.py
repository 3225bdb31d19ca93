"""Which pip packages decode which compressed DICOM transfer syntax, and how a failed decode is reported.

pydicom 3 decodes compressed pixel data through plugins that live in other packages. When none of them can
decode a file, the report must say which syntax it is and what to install (docs/ingest.md, "Compressed
transfer syntaxes"), not just that decoding failed.
"""

from __future__ import annotations

import importlib.metadata
import textwrap

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14

from pipeline.ingest import reasons as R
from pipeline.ingest.reasons import Rejected

LIBJPEG = ("pylibjpeg", "pylibjpeg-libjpeg")
OPENJPEG = ("pylibjpeg", "pylibjpeg-openjpeg")

# transfer syntax -> the pip package sets that decode it with pydicom 3, preferred first (each set is
# installed together: pylibjpeg's codecs are plugins of the `pylibjpeg` package). pyproject.toml installs
# all of them; this table names what is missing on a machine that lacks one.
DECODER_PACKAGES: dict[str, tuple[tuple[str, ...], ...]] = {
    JPEGBaseline8Bit: (LIBJPEG, ("pillow",), ("python-gdcm",)),
    # 12-bit samples: only libjpeg. Pillow and GDCM (through pydicom) decode the 8-bit files of this syntax
    JPEGExtended12Bit: (LIBJPEG,),
    JPEGLosslessP14: (LIBJPEG, ("python-gdcm",)),
    JPEGLosslessSV1: (LIBJPEG, ("python-gdcm",)),
    JPEGLSLossless: (("pyjpegls",), LIBJPEG, ("python-gdcm",)),
    JPEGLSNearLossless: (("pyjpegls",), LIBJPEG, ("python-gdcm",)),
    JPEG2000Lossless: (OPENJPEG, ("pillow",), ("python-gdcm",)),
    JPEG2000: (OPENJPEG, ("pillow",), ("python-gdcm",)),
    HTJ2KLossless: (OPENJPEG,),
    HTJ2KLosslessRPCL: (OPENJPEG,),
    HTJ2K: (OPENJPEG,),
    RLELossless: (("pylibjpeg", "pylibjpeg-rle"),),  # pydicom also has a slower decoder of its own
}

DETAIL_CHARS = 400  # a report detail is cut at a word boundary beyond this, never mid-word


def shorten(text: str, width: int = DETAIL_CHARS) -> str:
    """One line of at most `width` characters, cut between words ("..." marks a cut)."""
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def syntax_label(ts: str) -> str:
    uid = UID(str(ts))
    return f"{uid.name} ({uid})" if uid.is_transfer_syntax else str(uid)


def install_hint(ts: str) -> str:
    """What to install so that `ts` decodes: the preferred package set not fully installed here first."""
    options = DECODER_PACKAGES.get(str(ts))
    if not options:
        return "no Python package decodes it with pydicom 3; convert the file to an uncompressed syntax"
    missing = [o for o in options if not all(installed(d) for d in o)] or list(options)
    first, rest = missing[0], missing[1:]
    hint = f"pip install {' '.join(first)}"
    if rest:
        hint += " (or " + " / ".join(" ".join(o) for o in rest) + ")"
    return hint


def undecodable(ts: str, why: str) -> Rejected:
    """The `undecodable_transfer_syntax` rejection: the syntax by name and UID, why, and what to install."""
    return Rejected(R.UNDECODABLE, shorten(f"transfer syntax {syntax_label(ts)} {why}; {install_hint(ts)}"))


# pydicom's message when every plugin failed: a first line, then "  <plugin>: <error>" per plugin
_ALL_FAILED = "Unable to decode as exceptions were raised by all available plugins"
# a plugin refusing what it cannot do (bit depth, colour model), as opposed to a corrupt codestream
_CANNOT = ("does not support", "not supported", "unsupported")


def decode_failure(e: BaseException, ts: str | None) -> Rejected:
    """A pixel decode error -> `undecodable_transfer_syntax` when every installed plugin refused the file
    for what it cannot do (e.g. 12-bit JPEG Extended without libjpeg), else `unreadable` with the
    plugins' own errors, whole words only."""
    text = str(e) or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if ts and lines and lines[0].startswith(_ALL_FAILED):
        per_plugin = [ln for ln in lines[1:] if ":" in ln]
        refused = [ln for ln in per_plugin if any(c in ln.lower() for c in _CANNOT)]
        errors = [ln for ln in per_plugin if ln not in refused]
        if refused and not errors:
            reason = refused[0].split(":", 1)[1].strip()
            return undecodable(ts, f"cannot be decoded by the installed plugins ({reason})")
        shown = errors or per_plugin
        tail = f" ({', '.join(ln.split(':', 1)[0] for ln in refused)}: not supported)" if refused else ""
        return Rejected(R.UNREADABLE, shorten(f"pixel data could not be decoded: {'; '.join(shown)}{tail}"))
    return Rejected(R.UNREADABLE, shorten(f"pixel data could not be decoded: {' '.join(lines) or text}"))
