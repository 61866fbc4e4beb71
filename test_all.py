"""The project's tests: `python -m pytest test_all.py` (CPU, tiny model, offline, a few minutes)."""
import json
import os
import subprocess
import sys

import pytest

import common

HERE = os.path.dirname(os.path.abspath(__file__))
XQUAD_DIR = os.path.join(HERE, "data", "xquad")


# ---------------------------------------------------------------- common.py: I/O and errors

def test_common_load_squad_examples_reads_xquad():
    examples = common.load_squad_examples(os.path.join(XQUAD_DIR, "xquad.en.json"))
    assert len(examples) == 1190
    for ex in examples[:50]:
        ans = ex["answers"][0]
        assert ex["context"][ans["answer_start"]:ans["answer_start"] + len(ans["text"])] == ans["text"]


def test_common_squad_round_trip(tmp_path):
    examples = common.load_squad_examples(os.path.join(XQUAD_DIR, "xquad.de.json"))[:30]
    path = tmp_path / "x.json"
    common.atomic_write_json(str(path), common.examples_to_squad(examples))
    assert common.load_squad_examples(str(path)) == examples


@pytest.mark.parametrize("content, needle", [
    ('{"data": [', "not valid JSON"),
    ('{"version": "1.1"}', "'data'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q"}]}]}]}',
     "'answers'"),
])
def test_common_malformed_squad_names_the_problem(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(common.InputError) as err:
        common.load_squad_examples(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_common_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with common.atomic_output_dir(str(target)) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with common.atomic_output_dir(str(target)) as tmp:
        open(os.path.join(tmp, "done.txt"), "w").write("x")
    assert os.listdir(target) == ["done.txt"]
    with pytest.raises(common.InputError):
        with common.atomic_output_dir(str(target)):
            pass
    with common.atomic_output_dir(str(target), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("y")
    assert os.listdir(target) == ["new.txt"]


# ---------------------------------------------------------------- parts (merged in below)
from test_foundation import *  # noqa: E402,F401,F403
from test_train_qa import *  # noqa: E402,F401,F403
from test_distill import *  # noqa: E402,F401,F403
from test_eval import *  # noqa: E402,F401,F403
from test_bench import *  # noqa: E402,F401,F403
