"""The adapt stage (a meta-model + a few labelled scans -> a registered, servable model) and predict."""
