"""Pure client decisions: packing, parsing, throttling, retry and routing."""
