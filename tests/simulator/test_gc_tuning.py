"""The serving GC settings, checked in a child process (they are process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

from simulator.gc_tuning import YOUNG_THRESHOLD

_CHILD = """
import asyncio, gc, json
from simulator.model.config import default_config
from simulator.server import start_server

async def main(tune):
    before = gc.get_threshold()
    server = await start_server(default_config(), tune_gc=tune)
    try:
        return {"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}
    finally:
        await server.close()

print(json.dumps([asyncio.run(main(False)), asyncio.run(main(True))]))
"""


def test_serving_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    plain, tuned = json.loads(out)
    assert plain["after"] == plain["before"] and plain["frozen"] == 0  # embedding: untouched
    assert tuned["after"] == [YOUNG_THRESHOLD, *plain["before"][1:]]
    assert tuned["frozen"] > 10_000  # imports, routes and models no longer walked
