"""Operator switches of the backbone runtime (handlers/runtime.py), read from the environment."""

from __future__ import annotations

import pytest

from handlers.runtime import SPINNING_VAR, ort_spinning


@pytest.mark.parametrize("value, expected", [(None, False), ("", False), ("0", False), ("1", True)])
def test_ort_spinning_is_off_unless_asked_for(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(SPINNING_VAR, raising=False)
    else:
        monkeypatch.setenv(SPINNING_VAR, value)
    assert ort_spinning() is expected


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_ort_spinning_refuses_anything_but_0_or_1(monkeypatch, value):
    monkeypatch.setenv(SPINNING_VAR, value)
    with pytest.raises(ValueError, match=SPINNING_VAR):
        ort_spinning()
