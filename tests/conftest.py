"""Shared fixtures. Real services are started on loopback by the fixture modules below."""

pytest_plugins = [
    "tests.fixtures.broker_services",
    "tests.fixtures.backend_services",
]
