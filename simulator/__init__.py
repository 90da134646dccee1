"""The simulated OpenAI-compatible provider: a pure model (``simulator.model``) and its aiohttp shell."""
