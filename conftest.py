"""`pytest` runs the tests (tests/); `pytest --benchmark` runs the benchmarks
(benchmarks/, pytest-benchmark) instead."""
from pathlib import Path

import pytest

ROOT = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks in benchmarks/ instead of the tests")


def pytest_configure(config):
    if not config.getoption("benchmark"):
        return
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        config.args[:] = [str(ROOT / "benchmarks")]
    config.option.benchmark_disable_gc = True  # a collection pause is not the code's time
