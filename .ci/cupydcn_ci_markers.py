"""pytest plugin for .ci/run: records each test's markers as a junit property.

Loaded through PYTEST_ADDOPTS (``-p cupydcn_ci_markers`` with .ci/ on PYTHONPATH), so the
test command itself stays the README's. .ci/check_emulated.py reads outcomes and markers
from the one junit file.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        names = sorted({mark.name for mark in item.iter_markers()})
        item.user_properties.append(("markers", ",".join(names)))
