"""Make the project's top-level modules (rewards.py, flow_grpo.py) importable from tests, and define the markers.

Why the path: the project is a set of single files, not an installed package, and plain
`pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.

Markers (`python -m pytest -m gpu` runs only the GPU tests):
  gpu        needs a CUDA GPU; skipped where torch.cuda.is_available() is False (tests/test_gpu.py).
  tesseract  needs the tesseract program; skipped, with the install command, where it is missing, EXCEPT under CI
             (CI=true): there a missing program fails the test, so CI can never go green by skipping it.
  slow       compiles with torch.compile (tests/test_compile.py); runs by default, -m "not slow" skips it.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "tesseract: needs the tesseract program (skipped where missing, unless CI=true)")
    config.addinivalue_line("markers", "slow: compiles with torch.compile (about a minute on a CPU; -m 'not slow' skips)")
    # inductor imports torch.utils.mkldnn, whose 14 @torch.jit.script_method each warn (torch 2.11-2.13): not ours
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if item.get_closest_marker("tesseract") and shutil.which("tesseract") is None:
        if os.environ.get("CI", "").lower() not in ("true", "1"):
            pytest.skip("needs the tesseract program: apt-get install tesseract-ocr tesseract-ocr-eng (Debian/Ubuntu)")
