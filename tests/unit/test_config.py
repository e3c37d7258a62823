from pathlib import Path

import pytest

from conveyor_server.config import ConfigError, Settings, load_settings


def test_defaults_are_the_embedded_sqlite_on_loopback() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 50051
    assert settings.broker_url.startswith("sqlite:///")


def test_file_then_environment_override(tmp_path: Path) -> None:
    config = tmp_path / "conveyor.yaml"
    config.write_text("port: 6000\nbroker_url: redis://127.0.0.1:6379/0\nlimits:\n  max_args_bytes: 10\n")
    settings = load_settings(config, environ={"CONVEYOR_PORT": "7000", "CONVEYOR_LIMITS__MAX_WORKFLOW_DEPTH": "4",
                                              "CONVEYOR_ADDRESS": "client setting, ignored"})
    assert settings.port == 7000
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.limits.max_args_bytes == 10
    assert settings.limits.max_workflow_depth == 4


def test_unknown_keys_and_bad_values_are_clear_errors(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match="'port' expects int"):
        load_settings(environ={"CONVEYOR_PORT": "eighty"})
    with pytest.raises(ConfigError, match="expects bool"):
        load_settings(environ={"CONVEYOR_LOG_JSON": "perhaps"})
