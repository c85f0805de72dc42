"""Shared resources, no task code: the router service, budget keeper, pipelines, images,
keys, producer, exploration, retraining, telemetry (Prometheus), traffic reads."""
