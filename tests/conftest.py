"""Shared test helpers: the authors' reference fixtures and tolerance checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _find_fixtures() -> Path | None:
    env = os.environ.get("ACMIX_FIXTURES")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "fixtures"
        if cand.is_dir():
            return cand
        cand = parent.parent / "shared" / "fixtures"
        if cand.is_dir():
            return cand
    return None


FIXTURES = _find_fixtures()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Directory of the authors' reference fixtures (``shared/fixtures`` beside the repo)."""
    if FIXTURES is None:
        pytest.fail(
            "reference fixtures not found: expected shared/fixtures beside the repository "
            "or ACMIX_FIXTURES=<dir>"
        )
    return FIXTURES


def load_fixture(fixtures_dir: Path, name: str) -> dict:
    """Load one fixture file safely (tensors and plain containers only)."""
    return torch.load(fixtures_dir / f"{name}.pt", weights_only=True)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max magnitude of the truth ``b``."""
    return max_abs(a, b) / max(b.double().abs().max().item(), 1e-30)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
