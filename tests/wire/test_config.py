"""Config.from_env: PCCL_<FIELD> variables, typed by the field."""

from __future__ import annotations

import pytest

from pccl_py.config import Config
from pccl_py.errors import ConfigError


@pytest.mark.parametrize("raw,want", [("0", False), ("false", False), ("OFF", False), ("1", True), ("yes", True), (" on ", True)])
def test_boolean_fields_read_the_usual_spellings(raw: str, want: bool) -> None:
    assert Config.from_env({"PCCL_ZERO_COPY": raw}).zero_copy is want


def test_a_boolean_field_rejects_anything_else() -> None:
    with pytest.raises(ConfigError, match="PCCL_ZERO_COPY"):
        Config.from_env({"PCCL_ZERO_COPY": "maybe"})


def test_numbers_and_overrides() -> None:
    cfg = Config.from_env({"PCCL_HEARTBEAT_TIMEOUT": "10", "PCCL_SEGMENT_BYTES": "65536"}, op_timeout=3.0)
    assert (cfg.heartbeat_timeout, cfg.segment_bytes, cfg.op_timeout, cfg.zero_copy) == (10.0, 65536, 3.0, True)
    with pytest.raises(ConfigError):
        Config.from_env({"PCCL_SEGMENT_BYTES": "lots"})
