"""pipeline.json: reading, checking (protocol J-2, J-3, J-4) and live reload (J-5)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from msgpipe import ConfigError, LiveConfig, PipelineConfig


def notes(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "pipeline": "notes-app/notes",
        "vhost": "/",
        "exchange": "notes",
        "routing_key": "notes",
        "queue": "notes_queue",
        "max_attempts": 5,
        "retry": {
            "exchange": "notes_queue.retry",
            "tiers": [
                {
                    "index": i,
                    "routing_key": str(i),
                    "queue": f"notes_queue.retry.{i}.{2 ** (i - 1)}s",
                    "delay_ms": 1000 * 2 ** (i - 1),
                    "first_attempt": i,
                    "last_attempt": i,
                }
                for i in range(1, 5)
            ],
        },
        "dead_letter": {"exchange": "notes_dlq_exchange", "queue": "notes_queue_dlq"},
        "features": {"retry_pending": True, "retry_interval_seconds": 120},
    }
    data.update(changes)
    return data


def test_reads_every_field_and_ignores_unknown_ones() -> None:
    config = PipelineConfig.from_json(json.dumps(notes(added_by_a_newer_operator={"x": 1})))
    assert (config.exchange, config.routing_key, config.queue) == ("notes", "notes", "notes_queue")
    assert config.max_attempts == 5
    assert [t.delay_ms for t in config.retry.tiers] == [1000, 2000, 4000, 8000]
    assert config.dead_letter.exchange == "notes_dlq_exchange"
    assert config.features.retry_pending
    assert config.features.retry_interval_seconds == 120


def test_a_failure_before_the_last_attempt_names_its_tier() -> None:
    config = PipelineConfig.from_dict(notes())
    assert [config.tier_for_attempt(k).index for k in (1, 2, 3, 4)] == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert config.tier_for_attempt(5) is None
    assert config.tier_for_attempt(99) is None


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (notes(version=2), "version 2"),
        ({k: v for k, v in notes().items() if k != "queue"}, "queue"),
        (notes(max_attempts="5"), "integer"),
        (notes(features={"retry_pending": "yes", "retry_interval_seconds": 1}), "true or false"),
    ],
)
def test_refuses_other_versions_missing_fields_and_wrong_types_naming_the_file(
    tmp_path: Path, data: dict[str, Any], complaint: str
) -> None:
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as error:
        PipelineConfig.from_path(path)
    assert str(path) in str(error.value)
    assert complaint in str(error.value)


def test_missing_env_and_missing_file_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MSGPIPE_PIPELINE_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="MSGPIPE_PIPELINE_CONFIG"):
        PipelineConfig.from_env()
    monkeypatch.setenv("MSGPIPE_PIPELINE_CONFIG", str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"nope\.json"):
        PipelineConfig.from_env()


def kubelet_write(directory: Path, generation: int, text: str) -> None:
    """Writes the file the way the kubelet does: a new directory, then ``..data`` swapped."""
    target = directory / f"..gen_{generation}"
    target.mkdir()
    (target / "pipeline.json").write_text(text)
    scratch = directory / "..data_tmp"
    scratch.symlink_to(target.name)
    os.replace(scratch, directory / "..data")


async def test_a_flag_flipped_by_a_symlink_swap_is_seen_and_a_bad_file_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet_write(tmp_path, 1, json.dumps(notes()))
    path = tmp_path / "pipeline.json"
    path.symlink_to("..data/pipeline.json")
    changes: list[tuple[bool, bool]] = []
    async with LiveConfig.watch(path, poll_interval=0.02) as live:
        live.add_listener(
            lambda old, new: changes.append(
                (old.features.retry_pending, new.features.retry_pending)
            )
        )
        assert live.features.retry_pending
        kubelet_write(
            tmp_path,
            2,
            json.dumps(notes(features={"retry_pending": False, "retry_interval_seconds": 7})),
        )
        for _ in range(250):
            if not live.features.retry_pending:
                break
            await asyncio.sleep(0.02)
        assert not live.features.retry_pending
        assert live.features.retry_interval_seconds == 7
        assert changes == [(True, False)]

        caplog.set_level(logging.WARNING, logger="msgpipe")
        kubelet_write(tmp_path, 3, "{ not json")
        await asyncio.sleep(0.3)
        assert not live.features.retry_pending, "the last good file stays in force"
        warnings = [r for r in caplog.records if "ignoring the new pipeline.json" in r.message]
        assert len(warnings) == 1, "reported once, not at every poll"


async def test_watch_fails_at_once_on_a_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        await LiveConfig.watch(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError):
        await LiveConfig.watch(tmp_path / "bad.json")
