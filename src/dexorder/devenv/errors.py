"""Errors of the local service harness."""

from __future__ import annotations


class DevenvError(Exception):
    """Base of every error the harness raises."""


class PrerequisiteMissing(DevenvError):
    """A tool the harness needs is not installed; the message names what to install."""

    def __init__(self, tool: str, remedy: str) -> None:
        super().__init__(f"{tool} is not installed: {remedy}")
        self.tool = tool
        self.remedy = remedy


class ServiceFailed(DevenvError):
    """A service could not be built, or did not start and answer in time."""
