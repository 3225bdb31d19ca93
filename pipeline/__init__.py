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

# OpenMP threads must not spin (docs/scaling.md, "CPU threads and worker pools"). torch's CPU build here
# uses GNU OpenMP (libgomp; `torch.__config__.parallel_info()`), whose idle threads busy-wait for a while
# after each parallel region. On a machine whose other processes want the same cores, spinning threads
# steal the time the working ones need and a stage slows down far more than the load explains (issue 17:
# x28 for a x8 load). PASSIVE makes them sleep at once (libgomp's spin count becomes 0); the cost on an
# idle machine is a wake-up per parallel region. It must be set before the OpenMP runtime loads, i.e.
# before torch is imported, which is why it is here; a program that imported torch first keeps its setting.
# KMP_BLOCKTIME is the same knob for Intel's OpenMP (a torch built against libiomp5). A user who wants
# spinning sets OMP_WAIT_POLICY=ACTIVE.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("KMP_BLOCKTIME", "0")
