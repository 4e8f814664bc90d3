"""Property: any vars file yields replays or a ConfigError, never another exception."""

from __future__ import annotations

import string

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlflow_replay.config import REPLAY_KEYS, ConfigError
from mlflow_replay.vars_file import validate_vars_file

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["CHI@TACC", "CHI@UC", "s3://bucket-1/x", "https://h:7480/swift/v1/AUTH_p/c/",
                     "http://10.0.0.1:9000", "runs", "ftp://x", "?#", "a" * 70]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
keys = st.one_of(st.sampled_from(REPLAY_KEYS), st.text(alphabet=string.ascii_lowercase + "_", max_size=12))
documents = st.one_of(values, st.dictionaries(keys, values, max_size=8))


@settings(max_examples=300, deadline=None)
@given(document=documents)
def test_vars_file_loader_total(tmp_path_factory, document):
    vars_file = tmp_path_factory.mktemp("vars") / "replay.yml"
    vars_file.write_text(yaml.safe_dump(document))

    try:
        replays = validate_vars_file(vars_file)
    except ConfigError:
        return
    assert isinstance(replays, list)
    assert all(isinstance(replay["port"], int) for replay in replays)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_vars_file_loader_raw_text(tmp_path_factory, text):
    vars_file = tmp_path_factory.mktemp("raw") / "replay.yml"
    vars_file.write_text(text, encoding="utf-8")

    try:
        validate_vars_file(vars_file)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=100))
def test_vars_file_loader_raw_bytes(tmp_path_factory, data):
    vars_file = tmp_path_factory.mktemp("bytes") / "replay.yml"
    vars_file.write_bytes(data)

    try:
        validate_vars_file(vars_file)
    except ConfigError:
        pass
