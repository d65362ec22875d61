"""Model-set files and client tokens: parsing and refusals (no TorchServe needed)."""

from __future__ import annotations

import json

import pytest

from imagerec.gateway import ClientTokens
from imagerec.model_set import read_model_set


def write(tmp_path, models, **extra):
    path = tmp_path / "model-set.json"
    path.write_text(json.dumps({"revision": "r1", "models": models, **extra}))
    return path


def test_reads_a_set_with_checks_relative_to_the_file(tmp_path):
    path = write(tmp_path, [{"name": "bees_vs_ants", "version": 2, "archive": "bees_vs_ants_v2.mar",
                             "checks": [{"file": "checks/bee.jpg", "label": "bees"}], "sha256": "ab" * 32}])
    model_set = read_model_set(path)
    entry = model_set.models[0]
    assert (model_set.revision, entry.name, entry.version, entry.archive) == ("r1", "bees_vs_ants", "2",
                                                                               "bees_vs_ants_v2.mar")
    assert entry.checks == ((tmp_path / "checks" / "bee.jpg", "bees"),)


@pytest.mark.parametrize("models, message", [
    ([], "non-empty"),
    ([{"name": "a", "version": "1"}], "archive"),
    ([{"name": "a", "version": "1", "archive": "../a_v1.mar"}], "file name in the model store"),
    ([{"name": "a", "version": "1", "archive": "a_v1.zip"}], ".mar"),
    ([{"name": "a b", "version": "1", "archive": "a_v1.mar"}], "invalid model name"),
    ([{"name": "a", "version": "1", "archive": "a_v1.mar"}, {"name": "a", "version": "2", "archive": "a_v2.mar"}],
     "appears twice"),
])
def test_refuses_bad_sets(tmp_path, models, message):
    with pytest.raises(ValueError, match=message):
        read_model_set(write(tmp_path, models))


def test_client_tokens_from_a_file_rotate_without_restart(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    tokens = ClientTokens(token_file)
    assert tokens.accepts("Bearer first-token")
    assert not tokens.accepts("Bearer second-token")
    token_file.write_text("# rotating\nfirst-token\nsecond-token\n")
    assert tokens.accepts("Bearer second-token") and tokens.accepts("bearer first-token")
    token_file.write_text("second-token\n")
    assert not tokens.accepts("Bearer first-token")
    for header in (None, "", "Bearer", "Bearer ", "Basic second-token", "second-token", "Bearer # rotating"):
        assert not tokens.accepts(header), header


def test_client_tokens_need_a_source():
    with pytest.raises(ValueError, match="no client token"):
        ClientTokens(None, None)
    assert ClientTokens(None, "env-token").accepts("Bearer env-token")
