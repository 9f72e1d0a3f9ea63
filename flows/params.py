"""Typed flow parameters (shown as a form in the Prefect UI): the library's one data set type."""

from __future__ import annotations

from locdiff.orchestration.spec import DataSet

__all__ = ["DataSet"]
