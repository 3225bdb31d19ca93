"""The code file of an adapted model, saved as an MLflow "model from code" (docs/CONTRACTS.md, "Adapted model").

`fewscan adapt` copies this file into the model folder; `mlflow models serve` / `mlflow.pyfunc.load_model`
run it to build the model, then call `load_context`, which reads the weights of the `adapted` artifact with
`torch.load(weights_only=True)`. Nothing in a fewscan model is pickled. The class comes from the installed
fewscan (the model lists `fewscan==<version>` in its requirements): serve it in an environment with fewscan
installed, e.g. `--env-manager local` in fewscan's own. fewscan itself never runs this file: `fewscan
predict` reads the `adapted` folder directly (pipeline/serving.py, `load_adapted`).

Never imported by fewscan (importing it would set MLflow's process-wide "model from code"), only executed.
"""

from mlflow.models import set_model

from pipeline.serving import FewscanAdaptedModel

set_model(FewscanAdaptedModel())
