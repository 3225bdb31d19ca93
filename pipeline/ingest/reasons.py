"""Why a file or label row was not used. Every reason is counted in ingest_report.json and the summary."""

from __future__ import annotations

UNREADABLE = "unreadable"
NOT_IMAGE_OBJECT = "not_image_object"
NO_PIXEL_DATA = "no_pixel_data"
UNDECODABLE = "undecodable_transfer_syntax"
INCONSISTENT_SERIES = "inconsistent_series"
DUPLICATE_SOP = "duplicate_sop_instance"
NO_LABEL = "no_label"
LABEL_FOR_MISSING_FILE = "label_for_missing_file"
WRONG_DIMENSIONALITY = "wrong_dimensionality"
FORMAT_NOT_SELECTED = "format_not_selected"
LABEL_EXCLUDED = "label_excluded"  # labels.uncertain / labels.blank: exclude (one-hot label tables)
DICOMDIR = "dicomdir"  # a DICOM media directory index, not an image
TOO_SMALL = "too_small"  # rows or columns below preprocess.min_size
CONSTANT_IMAGE = "constant_image"  # every pixel equal after the VOI window
SYMLINK_LOOP = "symlink_loop"  # a symbolic link that leads back into itself or an enclosing folder
DANGLING_SYMLINK = "dangling_symlink"  # a symbolic link whose target does not exist

ALL = (
    UNREADABLE,
    NOT_IMAGE_OBJECT,
    NO_PIXEL_DATA,
    UNDECODABLE,
    INCONSISTENT_SERIES,
    DUPLICATE_SOP,
    NO_LABEL,
    LABEL_FOR_MISSING_FILE,
    WRONG_DIMENSIONALITY,
    FORMAT_NOT_SELECTED,
    LABEL_EXCLUDED,
    DICOMDIR,
    TOO_SMALL,
    CONSTANT_IMAGE,
    SYMLINK_LOOP,
    DANGLING_SYMLINK,
)


# A note (not a rejection) raised as a warning while decoding, e.g. "fewscan-note: transfer_syntax_inferred":
# the worker turns it, like pydicom's own warnings, into a code in the report (worker.warning_codes).
NOTE = "fewscan-note: "


class Rejected(Exception):
    """One input is unusable. `reason` is one of ALL; `detail` is PHI-free (no paths, names or UIDs)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
