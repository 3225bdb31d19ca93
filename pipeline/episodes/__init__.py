"""Episodes: condition split, patient-disjoint pools, few-shot episode samplers, leakage audit, and
episode -> tensor assembly. See docs/tasks.md for the suite keys and docs/CONTRACTS.md for the files."""
