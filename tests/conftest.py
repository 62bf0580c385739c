from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[None]:
    """Replace ``module.name`` with a wrapper that appends to the returned list on each call."""
    calls: list[None] = []
    original = getattr(module, name)

    def counting(*args: Any) -> Any:
        calls.append(None)
        return original(*args)

    monkeypatch.setattr(module, name, counting)
    return calls
