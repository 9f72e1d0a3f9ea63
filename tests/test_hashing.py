"""The canonical content hash (locdiff.hashing.stable_hash)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from locdiff.hashing import stable_hash


def test_it_is_the_sha256_of_the_sorted_compact_json():
    # written out by hand: keys sorted, json.dumps' default separators
    text = '{"a": 1, "b": [1, 2.5, "x"], "c": {"d": null, "e": true}}'
    assert stable_hash({"c": {"e": True, "d": None}, "b": [1, 2.5, "x"], "a": 1}) == \
        hashlib.sha256(text.encode()).hexdigest()


def test_key_order_does_not_matter_and_values_do():
    assert stable_hash({"x": 1, "y": 2}) == stable_hash({"y": 2, "x": 1})
    assert stable_hash({"x": 1}) != stable_hash({"x": 2})
    assert stable_hash([1, 2]) != stable_hash([2, 1])  # list order is content


def test_values_json_cannot_hold_are_hashed_as_their_text():
    assert stable_hash({"p": Path("/a/b")}) == stable_hash({"p": "/a/b"})
