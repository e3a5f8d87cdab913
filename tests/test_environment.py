"""The test environment is the one the `test` extra installs: a missing or too-old test dependency fails here, by
name, instead of turning the tests that need it into skips (only GPU tests skip, on machines without a GPU)."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements_of_the_test_extra() -> list[str]:
    """The strings of `test = [...]` under [project.optional-dependencies] (a regex: tomllib needs Python 3.11)."""
    text = PYPROJECT.read_text()
    section = text[text.index("[project.optional-dependencies]"):]
    block = re.search(r"^test\s*=\s*\[(.*?)\]", section, re.S | re.M)
    assert block, "no `test` extra in pyproject.toml"
    return re.findall(r'"([^"]+)"', block.group(1))


def test_every_test_extra_requirement_is_installed():
    extra = requirements_of_the_test_extra()
    assert "torch" in extra and any(r.startswith("transformers") for r in extra) and "openai>=1.0" in extra
    problems = []
    for line in extra:
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} does not satisfy {req.specifier}")
    assert not problems, "; ".join(problems) + ' (pip install -e ".[test]")'
