"""The harness: scenarios, Locust users, the live runner, the planner and the ``ratelab`` CLI."""
