"""Test options: ``--gpu`` runs the tests marked ``gpu`` (skipped otherwise)."""

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run the CUDA tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and the built library (--gpu)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="CUDA test: run with --gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
