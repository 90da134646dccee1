"""The SimPy capacity planner: the same provider model and client engine in virtual time."""
