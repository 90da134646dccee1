"""The simulated OpenAI-compatible provider.

A pure model (``simulator.model``) and its aiohttp shell (``simulator.server``).
"""
