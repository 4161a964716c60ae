"""``pipeline.json`` kept live: a flipped feature flag (or a changed topology) takes effect
without a restart.

A ConfigMap volume is updated by the kubelet with a symlink swap (``..data`` points at a new
directory), so the watcher re-reads the *path* on every poll and compares the text; it never
keeps a file handle. A file that stops parsing is reported once and the last good
configuration stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Generator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .config import ConfigError, Features, PipelineConfig, config_path_from_env

__all__ = ["DEFAULT_POLL_INTERVAL", "LiveConfig"]

log = logging.getLogger("msgpipe.config")

DEFAULT_POLL_INTERVAL = 5.0
"""Seconds between reads of the file. The kubelet refreshes ConfigMap volumes only every
minute or so, so polling faster buys little."""

Listener = Callable[[PipelineConfig, PipelineConfig], None]


class LiveConfig:
    """The current ``pipeline.json``, re-read in the background.

    Use :meth:`watch` (or ``async with LiveConfig.watch(...)``) for a file, :meth:`fixed` for a
    configuration built in code. Readers take :attr:`current` / :attr:`features` whenever they
    need them; :meth:`add_listener` calls back on every change.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self._config = config
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def fixed(cls, config: PipelineConfig) -> LiveConfig:
        """A configuration that never changes (tests, or a client configured in code)."""
        return cls(config)

    @classmethod
    def watch(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> _Watch:
        """Reads ``path`` (default: ``$MSGPIPE_PIPELINE_CONFIG``) now, failing with
        :class:`~msgpipe.ConfigError` if it is missing or invalid, and re-reads it every
        ``poll_interval`` seconds until :meth:`aclose`. Await it, or use it as an async
        context manager that stops the polling on exit::

            config = await LiveConfig.watch("/etc/msgpipe/pipeline.json")
            async with LiveConfig.watch() as config:
                ...
        """
        file = Path(path) if path is not None else None
        return _Watch(cls, file, max(poll_interval, 0.01))

    @classmethod
    async def _start(cls, path: Path | None, poll_interval: float) -> LiveConfig:
        file = path if path is not None else config_path_from_env()
        text = await asyncio.to_thread(_read, file)
        live = cls(PipelineConfig.from_json(text, str(file)))
        live._task = asyncio.create_task(
            live._poll(file, text, poll_interval), name="msgpipe-config-watch"
        )
        return live

    @property
    def current(self) -> PipelineConfig:
        """The configuration in force now."""
        return self._config

    @property
    def features(self) -> Features:
        """The feature flags in force now."""
        return self._config.features

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Calls ``listener(old, new)`` after every change; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def replace(self, config: PipelineConfig) -> None:
        """Puts ``config`` in force now and tells the listeners (what a poll does on a change)."""
        old, self._config = self._config, config
        if old == config:
            return
        if old.features != config.features:
            log.info(
                "pipeline.json features changed: retry_pending=%s retry_interval_seconds=%s",
                config.features.retry_pending,
                config.features.retry_interval_seconds,
            )
        for listener in list(self._listeners):
            try:
                listener(old, config)
            except Exception:
                log.exception("a pipeline.json listener failed")

    async def aclose(self) -> None:
        """Stops re-reading the file."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _poll(self, file: Path, last_text: str, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                text = await asyncio.to_thread(_read, file)
            except ConfigError as error:
                # Mid-swap the path can be briefly missing; the next poll sees the new file.
                log.debug("pipeline.json not readable this time: %s", error)
                continue
            if text == last_text:
                continue
            last_text = text
            try:
                config = PipelineConfig.from_json(text, str(file))
            except ConfigError as error:
                log.warning("ignoring the new pipeline.json, keeping the last good one: %s", error)
                continue
            self.replace(config)


class _Watch:
    """What :meth:`LiveConfig.watch` returns: awaitable, and an async context manager."""

    def __init__(self, cls: type[LiveConfig], path: Path | None, poll_interval: float) -> None:
        self._cls = cls
        self._path = path
        self._poll_interval = poll_interval
        self._live: LiveConfig | None = None

    def __await__(self) -> Generator[Any, None, LiveConfig]:
        return self._cls._start(self._path, self._poll_interval).__await__()

    async def __aenter__(self) -> LiveConfig:
        self._live = await self
        return self._live

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            await self._live.aclose()


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {file}: {error.strerror}") from error
