"""The README's Python examples run as written (PyTorch examples need torch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = [
    block
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    if "import cupydcn" in block
]


def test_readme_has_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys):
    example = EXAMPLES[index]
    if "import torch" in example:
        pytest.importorskip("torch")
    exec(compile(example, f"README example {index}", "exec"), {})
