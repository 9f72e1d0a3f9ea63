"""One tiny trained run, small tables and a features stage, shared by the fault tests of a module."""

from __future__ import annotations

import pytest

from .helpers import World, build_world


@pytest.fixture(scope="package")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))
