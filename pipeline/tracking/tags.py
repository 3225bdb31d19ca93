"""The tag keys fewscan writes on runs and experiments: what links a stage run to its upstream runs, its
fingerprint, its owner and its lease (docs/CONTRACTS.md, "Tags"). No mlflow: plain strings that the rest of
the tracking layer, `pipeline/claims.py` and the tests share."""

from __future__ import annotations

TAG_STAGE = "fewscan.stage"
TAG_FINGERPRINT = "fewscan.fingerprint"
TAG_SUITE = "fewscan.suite"
TAG_DATASET = "fewscan.dataset"
TAG_CODE = "fewscan.code_version"
TAG_NUMERICS = "fewscan.numerics"  # JSON of `numerics(stage)`, for stages that run the engine
TAG_ERROR = "fewscan.error"
TAG_UPSTREAM = "fewscan.upstream."  # + stage: the run id of the upstream run the stage consumed
TAG_VERSION = "fewscan.version"
TAG_CHAIN = "fewscan.chain"  # "true" on the parent run of `fewscan run`
TAG_NOTE = "mlflow.note.content"  # shown as the run's description in the UI
TAG_PARENT = "mlflow.parentRunId"
TAG_USER = "mlflow.user"  # MlflowClient.create_run takes the run's user_id from this tag
TAG_OWNER = "fewscan.owner"  # experiment tag: who created it (for people; the proof is what we check)
TAG_OWNER_PROOF = "fewscan.owner_proof."  # + key id: HMAC of (user, experiment id) with the owner key
# The lease of a RUNNING run (docs/scaling.md, "Killed runs"): who runs it and when it last said so.
TAG_HOST = "fewscan.host"
TAG_PID = "fewscan.pid"
TAG_HEARTBEAT = "fewscan.heartbeat"  # unix seconds, refreshed every leases.HEARTBEAT_S while the run is open
