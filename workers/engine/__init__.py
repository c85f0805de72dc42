"""What runs inside a worker: the task shells, the step runner (attempts, retries,
backoff), batching, the sweeper."""
