"""Runs last of the fuzz modules (by name): over 10,000 inputs were generated in all."""

from __future__ import annotations

import pytest

from tests.fuzzing import FUZZED


def test_at_least_10000_inputs_were_fuzzed() -> None:
    total = sum(FUZZED.values())
    print(f"fuzzed inputs: {total} {dict(FUZZED)}")
    if len(FUZZED) < 10:
        pytest.skip(f"only part of the module ran ({total} inputs)")
    assert total >= 10_000, dict(FUZZED)
