"""fewscan: few-shot medical imaging with MAML, every stage an MLflow run."""

import os as _os

__version__ = "0.1.0"

# A hospital tool sends nothing anywhere by default: MLflow's usage telemetry is off for every fewscan
# entry point (the CLI, `fewscan ui` and the server it starts, which inherits the environment, and any
# program importing the package), set here because this runs before any fewscan module imports mlflow.
# A user who wants it sets MLFLOW_DISABLE_TELEMETRY=false explicitly (README, "Privacy").
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
