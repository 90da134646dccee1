"""The queue-fronted gateway service: enqueue, poll, per-user limits and lanes."""
