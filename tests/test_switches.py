"""engines/cuda/switches.py: the switchable kernel paths' defaults, the DS4CUPY_<NAME> values, the errors, and the
module's table (what the docs say) agreeing with DEFAULTS (what the code does)."""
from __future__ import annotations

import re

import pytest

from ds4cupy.engines.cuda import switches


def test_defaults_and_overrides(monkeypatch):
    for name, default in switches.DEFAULTS.items():
        monkeypatch.delenv(f"DS4CUPY_{name}", raising=False)
        assert switches.enabled(name) is default
        monkeypatch.setenv(f"DS4CUPY_{name}", "")
        assert switches.enabled(name) is default
        monkeypatch.setenv(f"DS4CUPY_{name}", "1")
        assert switches.enabled(name) is True
        monkeypatch.setenv(f"DS4CUPY_{name}", "0")
        assert switches.enabled(name) is False


def test_bad_values_and_names_are_named(monkeypatch):
    monkeypatch.setenv("DS4CUPY_BRANCHES", "yes")
    with pytest.raises(ValueError, match=r"DS4CUPY_BRANCHES='yes'.*1 \(on\) or 0 \(off\).*default \(on\)"):
        switches.enabled("BRANCHES")
    with pytest.raises(KeyError, match="'NOPE'"):
        switches.enabled("NOPE")


def test_docstring_table_matches_defaults():
    rows = re.findall(r"^\| (\w+) +\|.*\| (on|off) +\|$", switches.__doc__, flags=re.M)
    assert {name: state == "on" for name, state in rows} == switches.DEFAULTS

