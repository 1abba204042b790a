"""Shared pytest setup: offline, quiet, deterministic CPU defaults for every test.

Keep this file to cross-cutting fixtures only. Environment variables are set at import time (before
any test module imports Ray, transformers or datasets, which read them once); fixtures that need a
running service (e.g. a session-scoped Ray cluster) go below the marked section.
"""
from __future__ import annotations

import os

# -- environment (must be set before Ray / Hugging Face libraries are imported) ------------------
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",          # no usage reporting from test clusters
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",                   # tests never reach the hub
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",       # no fork warnings from tokenizers
}
for _key, _value in _ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite's timings (the bandit's 60 s bound included) are specified for 2 CPU cores.
TORCH_THREADS = 2
torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Restore the thread count after each test (a test or a worker may change it)."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


# -- service fixtures (session-scoped) -----------------------------------------------------------
