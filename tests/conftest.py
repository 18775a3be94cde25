"""Shared fixtures: a micro base model and a small real corpus for end-to-end runs."""

import sysconfig
from pathlib import Path

import pytest

from micro import make_micro_base


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_micro_base(tmp_path_factory.mktemp("micro") / "base")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few real documents (stdlib modules) as .txt files: fast to tokenize."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py"):
        (d / (name + ".txt")).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return d
