"""The ResNet-26 residual-adapter model: architecture, weight files, and the inference engine.

Nothing here knows about HTTP or training loops; `training/` and `service/` build on it.
"""
