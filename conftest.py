"""Options shared by tests/ and benchmarks/.

``--gpu`` runs the items marked ``gpu`` (skipped otherwise) and fails at once without a CUDA device.
``--quick`` makes the benchmarks run at small sizes with one repeat (see benchmarks/conftest.py).
``--slow`` also runs the items marked ``slow`` (heavier sizes of checks the default run makes at
smaller sizes); ``.ci/run`` runs them.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run the CUDA tests and benchmarks")
    parser.addoption("--quick", action="store_true", help="benchmarks: small sizes, one repeat")
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and the built library (--gpu)")
    config.addinivalue_line("markers", "slow: heavy sizes, run with --slow (CI does)")
    if config.getoption("--gpu"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu was given but torch sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run with --gpu")
    skip_slow = pytest.mark.skip(reason="heavy size: run with --slow")
    for item in items:
        if "gpu" in item.keywords and not config.getoption("--gpu"):
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)
