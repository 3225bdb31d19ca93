"""fewscan: few-shot medical imaging with MAML, every stage an MLflow run."""

__version__ = "0.1.0"
