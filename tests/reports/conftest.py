"""Fixtures of the report tests: a synthetic run folder (see synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reports.synthetic import build_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A synthetic run folder with a sweep and stages, so every plot applies."""
    return build_run(tmp_path / "run", sweep=True, stages=True)[0]
