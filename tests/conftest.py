"""Shared fixtures live in tests/support/<area>.py, one module per real component."""

pytest_plugins = [
    "tests.support.emulator",
    "tests.support.redis_server",
    "tests.support.s3_server",
    "tests.support.operator",
    "tests.support.sandbox",
]
