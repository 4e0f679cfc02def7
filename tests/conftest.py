"""Make the project's top-level modules (rewards.py, flow_grpo.py) importable from tests.

Why: the project is a set of single files, not an installed package, and plain
`pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    # tests/test_gpu.py: the checks that matter most, repeated on a GPU in bf16; skipped where CUDA is absent.
    # `python -m pytest -m gpu` runs only them.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where torch.cuda.is_available() is False)")
