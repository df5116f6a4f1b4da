"""Every module says what it exports, and the package exports exist (as httpx checks)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

import pytest

import cipherface

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(cipherface.__path__, prefix="cipherface.")
)


def isort_key(name: str) -> tuple[int, list[int | str]]:
    """Ruff's RUF022 order: CONSTANTS, then Classes, then functions; natural sort within."""
    category = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return category, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def test_package_exports_exist_and_are_sorted() -> None:
    assert cipherface.__all__ == sorted(cipherface.__all__, key=isort_key)
    assert len(set(cipherface.__all__)) == len(cipherface.__all__)
    missing = [name for name in cipherface.__all__ if not hasattr(cipherface, name)]
    assert not missing


def test_package_exports_are_documented() -> None:
    undocumented = [
        name
        for name in cipherface.__all__
        if callable(member := getattr(cipherface, name)) and not member.__doc__
    ]
    assert not undocumented


def test_modules_are_found() -> None:
    assert {"cipherface.core", "cipherface.crypto", "cipherface.embedding"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_module_declares_all(module_name: str) -> None:
    # Importing is part of the test: a module that fails to import fails here.
    module: ModuleType = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} declares no __all__"
    assert exported == sorted(exported, key=isort_key)
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what it does not define: {missing}"
