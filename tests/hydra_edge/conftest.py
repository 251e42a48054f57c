"""Fixtures of the hardening tests (test_hardening*.py): copies of the session's trained run and
adapter, which a test may damage without spoiling them for the others."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def run_copy(checkpointed_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(checkpointed_run, copy)
    return copy


@pytest.fixture
def adapter_copy(trained_adapter, tmp_path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(trained_adapter, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy
