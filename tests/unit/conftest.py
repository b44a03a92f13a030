"""Fixtures shared by the unit tests that build a tiny experiment (unit_helpers.tiny_experiment)."""

from __future__ import annotations

import pytest
from helpers import write_tiny_data

from declora import engine


@pytest.fixture
def tiny_data(tmp_path):
    """80 labelled rows (a module may override it with another size)."""
    return write_tiny_data(tmp_path / "tiny.jsonl", rows=80)


@pytest.fixture
def no_report(monkeypatch):
    """Skip the run report (its figures take longer than the tiny runs themselves)."""
    monkeypatch.setattr(engine, "write_report", lambda run_dir: None)
