"""Shared fixtures live in tests/support/<area>.py, one module per real component."""

import pytest

pytest_plugins = [
    "tests.support.emulator",
    "tests.support.kubernetes",
    "tests.support.logs",
    "tests.support.redis_server",
    "tests.support.s3_server",
    "tests.support.operator",
    "tests.support.sandbox",
]


def pytest_addoption(parser: "pytest.Parser") -> None:
    parser.addoption(
        "--chaos-size",
        choices=["small", "full"],
        default="small",
        help="size of the chaos suite: small (make test) or full (make chaos: 2,000 jobs, 20 kills)",
    )
