"""The service, by process: `frontend/` runs N times per host, `engine/` once per device, `record/` is the
registry of record; at this root only what several processes share, the supervisor and `boot`, which wires
the one-process mode (see docs/serving.md).
"""
