"""Options shared by tests/ and benchmarks/.

``--gpu`` runs the items marked ``gpu`` (skipped otherwise) and fails at once without a CUDA device.
``--quick`` makes the benchmarks run at small sizes with one repeat (see benchmarks/conftest.py).
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run the CUDA tests and benchmarks")
    parser.addoption("--quick", action="store_true", help="benchmarks: small sizes, one repeat")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and the built library (--gpu)")
    if config.getoption("--gpu"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu was given but torch sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs CUDA: run with --gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
