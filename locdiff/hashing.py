"""Content identities: the one canonical hash of plain values (a run's completion key, a data source's
identity, a gallery's build settings are all `stable_hash` of JSON-able values)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of obj (sorted keys; values JSON cannot hold are written as str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
