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
)


class Rejected(Exception):
    """One input is unusable. `reason` is one of ALL; `detail` is PHI-free (no paths, names or UIDs)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
