"""The Celery app and what producers and workers share: its configuration, the flow
(steps, task names, the one send path), the broker transport, liveness, threads."""
