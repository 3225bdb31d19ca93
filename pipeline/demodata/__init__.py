"""The built-in synthetic chest-radiograph study (`fewscan make-demo-data`).

A procedurally rendered, NIH ChestX-ray14-shaped DICOM study: real DICOM files in a PACS-like tree,
an NIH `Data_Entry_2017`-style label file, several simulated vendors, fake-but-realistic PHI headers,
~1% junk, and a CT series variant. Everything is deterministic from one seed.

Modules: `prevalence` (label counts and label sets), `plan` (patients, follow-ups, files), `phi` (fake
identities), `anatomy` (chest anatomy), `findings` (the 14 rendered findings), `vendors` (acquisition
and processing per simulated vendor), `dicomio` (DICOM writing), `ct` (the 3D series variant),
`junk` (realistic broken files), `labels` (labels.csv), `generate` (the orchestration), `cli`.
"""
