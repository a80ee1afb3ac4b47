"""Fixtures for the integration tests: a token dataset, a factory for a real ``transformers.Trainer``'s
arguments, and the engine tests' ``corpus`` / ``tiny_recipe`` (re-exported, not copied)."""

import importlib.util
from pathlib import Path

import pytest

from .helpers import TokenDataset, trainer_arguments

_spec = importlib.util.spec_from_file_location("engine_conftest", Path(__file__).parents[1] / "engine" / "conftest.py")
_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine)
corpus, tiny_recipe = _engine.corpus, _engine.tiny_recipe


@pytest.fixture
def token_dataset():
    return TokenDataset


@pytest.fixture
def trainer_args(tmp_path):
    """Factory: ``trainer_args(**overrides)`` -> CPU TrainingArguments logging every step, no reports."""
    return lambda **overrides: trainer_arguments(str(tmp_path / "hf"), **overrides)
