"""The meta-learning engine: models, the one functional inner loop, the MAML family, ProtoNet, meta-model I/O.

Pure maths and torch; nothing here imports mlflow (docs/ARCHITECTURE.md, principle 2).
"""
