"""The embedded default model, through the command line a user types."""

import re

import pytest
from conftest import run_mtpd

pytestmark = pytest.mark.real_model


def test_code_prompt_gives_a_python_function():
    done = run_mtpd("generate", "--max-tokens", "80", "Write a Python function that checks whether a number is prime.")
    assert done.returncode == 0, done.stderr
    assert re.search(r"def \w+\(", done.stdout)
    assert re.search(r"prompt tokens: \d+, completion tokens: \d+, [\d.]+ tok/s", done.stderr)
    assert "OpenBLAS" in done.stderr or "Metal" in done.stderr  # the log names the BLAS in use
