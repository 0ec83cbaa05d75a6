"""The shape every local service shares: start, describe, stop, and leave nothing behind."""

from __future__ import annotations

import abc
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self


class Service(abc.ABC):
    """A real server on loopback with a private data directory, removed when it stops."""

    name: str = "service"

    def __init__(self) -> None:
        self._data_dir: Path | None = None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix=f"dexorder-{self.name}-"))
        return self._data_dir

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and return once it answers."""

    @abc.abstractmethod
    def _stop_processes(self) -> None:
        """Stop every process the service started."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """How to reach the service: URLs, paths, credentials for loopback use."""

    def stop(self) -> None:
        try:
            self._stop_processes()
        finally:
            if self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)
                self._data_dir = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
