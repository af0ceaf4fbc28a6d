"""The front end: what runs N times per host (HTTP, OIP over REST and gRPC, access, decoding, answers).

It never imports the engine or a deep-learning framework: it reaches the engine through an
`service.client.EngineClient` (in this process or over `service.transport`).
"""
