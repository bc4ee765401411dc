"""Reading a golden store: a run (golden.open_store) and the canary (canary.load_expectations) take it through one
check, golden.verified_store, so both accept an intact store of stories260K and refuse an edited one alike."""

from __future__ import annotations

import shutil

import pytest

from precision.errors import MismatchedCapturesError


@pytest.fixture(scope="module")
def store(stories_path, short_prompts, tmp_path_factory):
    from precision.cli import main

    out = tmp_path_factory.mktemp("golden") / "store"
    assert main(["-q", "golden", "create", "--model", str(stories_path), "--prompts", str(short_prompts), "--out", str(out)]) == 0
    return out


def _plan(stories, short_prompts):
    from precision.planning import plan_from_prompts
    from precision.prompts import DEFAULT_MAX_NEW_TOKENS

    return plan_from_prompts(short_prompts, stories, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)


def test_an_intact_store_opens_for_a_run_and_for_the_canary(store, stories, short_prompts):
    from precision.canary import load_expectations
    from precision.golden import open_store, verified_store

    assert verified_store(store)["prompt_ids"] == ["story", "chat"]
    reference, truth, members, _ = open_store(store, stories, _plan(stories, short_prompts))
    assert [r.id for r in reference.prompts] == [r.id for r in truth.prompts] == ["story", "chat"] and members
    expectations = load_expectations(store)
    assert [p.id for p in expectations] == ["story", "chat"] and all(p.members for p in expectations)


@pytest.mark.parametrize("edited", ["captures/truth/tensors/0000.safetensors", "compact.safetensors"])
def test_an_edited_store_is_refused_by_both_readers_with_one_message(store, stories, short_prompts, tmp_path, edited):
    from precision.canary import load_expectations
    from precision.golden import open_store

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    target = copy / edited
    data = bytearray(target.read_bytes())
    data[-10] ^= 0x40
    target.write_bytes(bytes(data))
    with pytest.raises(MismatchedCapturesError) as by_run:
        open_store(copy, stories, _plan(stories, short_prompts))
    with pytest.raises(MismatchedCapturesError) as by_canary:
        load_expectations(copy)
    assert str(by_run.value) == str(by_canary.value)
    message = str(by_run.value)
    assert "does not match its recorded hashes" in message and target.name in message and "golden verify" in message
