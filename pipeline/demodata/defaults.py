"""The generator's defaults, apart from the generator (numpy, pydicom) so that `fewscan make-demo-data
--help` and `fewscan --help` show them without importing it (README, "Command line")."""

from __future__ import annotations

MODALITIES = ("DX", "CR", "CT")
DEFAULT_MIN_PER_FINDING = 40  # images; with 1.5 disease images per patient, ~27 distinct patients

# How strongly findings show against the anatomy. At 1.0 the findings are as faint as the anatomy model
# draws them, and at the demo's 64x64 a Conv-4 trained with full supervision on the 7 common findings
# barely beats chance (macro AUC about 0.61 on held-out scans); at 3.0 it reaches about 0.9 — the positive
# control the demo needs so that a few-shot comparison measures transfer, not noise. Measured figures and
# the study behind the choice: benchmarks/RESULTS.md (section "demo study").
DEFAULT_CONSPICUITY = 3.0
