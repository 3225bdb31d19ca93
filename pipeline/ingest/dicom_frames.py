"""Multi-frame DICOM decoded one frame at a time, so that a worker's memory does not grow with the file.

Decoded whole, a 120-frame ultrasound file took 1.07 GB in one worker: the decoded array, its float32 copy
after the modality LUT, another after the window, the colour transpose. Here the frames are read from the
open file one by one (`pydicom.pixels.iter_pixels` reads only the bytes of the frame it decodes), each
is taken to [0, 1] and handed on to be reduced to the stored size, then dropped: a worker holds one
decoded frame plus the stored images, whatever the number of frames (docs/ingest.md, "Multi-frame files").

The result equals the whole-array path (`dicom_read.decode_frames`) value for value: every step works
pixel by pixel except two that need the whole file, which take one extra pass over the frames first:
min-max (when no window applies) spans all frames of a file, so that its frames keep their relative
brightness, and PALETTE COLOR is scaled by the largest value its LUT reaches in the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, iter_pixels

from pipeline.ingest import reasons as R
from pipeline.ingest.dicom_codecs import decode_failure
from pipeline.ingest.dicom_read import (
    DECODE_ERRORS,
    check_decodable,
    palette_top,
    presentation_inverse,
    read_dataset,
    to_modality,
    to_unit,
    voi_rule,
)
from pipeline.ingest.reasons import Rejected


@dataclass
class UnitFrames:
    rule: str  # the VOI rule for grey ("+inverted" when inverted), "rgb_bitdepth" for colour
    grey: bool
    frames: Iterator[tuple[int, np.ndarray]]  # (frame index, (C, H, W) float32 in [0, 1]), C = 1 or 3


def raw_frames(
    ds: Dataset, fh: BinaryIO | None, indices: Sequence[int] | None = None
) -> Iterator[np.ndarray]:
    """Frames as pydicom decodes them ((H, W) or (H, W, S)), one at a time, read from `fh` (the open
    file; `ds` is its header) or, with `fh` None, from `ds`'s own Pixel Data."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        if fh is None:
            yield from iter_pixels(ds, indices=indices)
        elif ts is not None and ts.is_deflated:  # a deflated stream cannot be read from the middle
            yield from iter_pixels(read_dataset(fh), indices=indices)
        else:
            # the syntax read (or inferred, for a file without file meta) from the header
            yield from iter_pixels(fh, indices=indices, transfer_syntax_uid=ts)
    except DECODE_ERRORS as e:
        if "no 'Pixel Data'" in str(e):
            raise Rejected(R.NO_PIXEL_DATA, "image object has no pixel data") from None
        raise decode_failure(e, ts) from None


def unit_frames(
    ds: Dataset,
    fh: BinaryIO | None,
    voi: str,
    window: dict[str, float] | None,
    indices: Sequence[int] | None = None,
) -> UnitFrames:
    """The frames `indices` (all by default) of a multi-frame image in [0, 1], decoded one at a time:
    the same values as `dicom_read.decode_frames(ds)[0][i]`."""
    check_decodable(ds)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    order = list(indices) if indices is not None else list(range(n))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    grey = int(ds.get("SamplesPerPixel", 1) or 1) == 1 and photometric != "PALETTE COLOR"
    if not grey:
        top = None
        if photometric == "PALETTE COLOR":  # pass 1: the LUT's full scale over every frame of the file
            top = max(palette_top(apply_color_lut(a, ds)) for a in raw_frames(ds, fh))

        def colour() -> Iterator[tuple[int, np.ndarray]]:
            for i, a in zip(order, raw_frames(ds, fh, order)):
                yield i, to_modality(a, ds, 1, top)[0][0]

        return UnitFrames("rgb_bitdepth", False, colour())
    rule = voi_rule(ds, voi, window)
    lohi = None
    if rule == "minmax":  # pass 1: the min-max range spans all frames of the file
        lo, hi = np.inf, -np.inf
        for a in raw_frames(ds, fh):
            x = to_modality(a, ds, 1)[0]
            lo, hi = min(lo, float(np.min(x))), max(hi, float(np.max(x)))
        lohi = (lo, hi)

    def grey_frames() -> Iterator[tuple[int, np.ndarray]]:
        for i, a in zip(order, raw_frames(ds, fh, order)):
            y, _ = to_unit(to_modality(a, ds, 1)[0], ds, voi, window, lohi)
            yield i, y  # (1, H, W)

    return UnitFrames(rule + ("+inverted" if presentation_inverse(ds) else ""), True, grey_frames())
