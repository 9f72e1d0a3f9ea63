"""Typed flow parameters (shown as a form in the Prefect UI): the library's one data set type, and a path or
URL that refuses user:password@ in the schema the Prefect API checks a deployment run against."""

from __future__ import annotations

from locdiff.orchestration.spec import DataSet, Location

__all__ = ["DataSet", "Location"]
