"""The docs stay true: docs/models.md's table is what the zoo generates (its parameter counts
are the reference counts, which tests/test_models.py checks against the models), every relative
link in the README and docs/ points at a file that exists, and the README stays short."""

import os
import re

from jaxvision.models import table
from tests.test_engine import ROOT
from tests.test_models import REFERENCE_PARAMS

DOCS = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]


def test_the_model_table_is_current():
    with open(os.path.join(ROOT, "docs", "models.md")) as f:
        document = f.read()
    assert table.replace(document, table.markdown(REFERENCE_PARAMS)) == document, \
        "docs/models.md is stale: python -m jaxvision.models.table --write docs/models.md"


def test_relative_links_point_at_files():
    broken = []
    for path in DOCS:
        with open(path) as f:
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read()):
                if "://" not in target and not os.path.exists(os.path.join(os.path.dirname(path), target)):
                    broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_for_newcomers():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 200
    commands = "\n".join(lines[:12])
    assert 'pip install -e ".[cpu,test]"' in commands and "python -m pytest -q" in commands
