"""The committed corpus of crafted files (tests/corpus/): each reader gives the
expected error for each damaged file and loads the good ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cml_rs
from cml_rs import datasets

CORPUS = Path(__file__).with_name("corpus")
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
READERS = {"lsh": cml_rs.LshIndex.load, "model": cml_rs.CML.load, "split": datasets.Split.load}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_crafted_file_gives_its_expected_error(name):
    read = READERS[name.split("_", 1)[0]]
    expected = EXPECTED[name]
    if not expected["error"]:
        assert read(CORPUS / name) is not None
        return
    with pytest.raises(Exception) as raised:
        read(CORPUS / name)
    assert type(raised.value).__name__ == expected["error"]
    assert expected["message"] in str(raised.value), str(raised.value)
