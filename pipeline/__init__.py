"""fewscan: few-shot medical imaging with MAML, every stage an MLflow run."""

import os as _os

__version__ = "0.1.0"

# A hospital tool sends nothing anywhere by default: MLflow's usage telemetry is off for every fewscan
# entry point (the CLI, `fewscan ui` and the server it starts, which inherits the environment, and any
# program importing the package), set here because this runs before any fewscan module imports mlflow.
# A user who wants it sets MLFLOW_DISABLE_TELEMETRY=false explicitly (README, "Privacy").
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# A stage prints fewscan's own progress lines and its one-line summary, nothing else (docs/ARCHITECTURE.md,
# principle 11): MLflow's INFO chatter (database creation, system-metrics start/stop, input-example
# validation) and its "Downloading artifacts" bars (shown even for files already on local disk when it
# validates a logged model) are off unless the user sets these variables. Warnings still reach the user.
_os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
