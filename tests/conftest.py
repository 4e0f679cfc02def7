"""Make the project's top-level modules (rewards.py, flow_grpo.py) importable from tests.

Why: the project is a set of single files, not an installed package, and plain
`pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# --- the `slow` marker (tests/test_compile.py: torch.compile costs about a minute on a CPU; -m "not slow" skips) ---
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles with torch.compile (about a minute on a CPU)")
