"""The pure provider model: no I/O, no asyncio; the clock and the RNG are parameters."""
