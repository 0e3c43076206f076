"""The one prompt type (data/prompt.py): normalising, validating with errors that name the field, and hashes
that stay equal to the values stores, datasets and collect journals already hold."""

from __future__ import annotations

import json

import pytest

from prefill_router.collect.prompts import read_prompts
from prefill_router.data import read_routing_data
from prefill_router.data.prompt import as_prompt, check_prompt, prompt_hash, prompt_hashes, prompt_text
from prefill_router.errors import DataError
from prefill_router.features.template import as_messages
from prefill_router.serve.engine import BadMessages, routing_messages

TEXT = "What is 17 * 23?"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界"}]
SPACES = "café \n\t"

# Computed with the implementations these schemes replaced (features/template.prompt_hash, collect's
# _content_id, the dataset readers' sha1 id) before they were folded into data/prompt.py. Stores, journals
# and datasets on disk hold these values: they must never change.
PERSISTED = {
    "features": ["801da7f4b8e111a83a15ab2440812b7d", "27283e77854d83d482c758c2fcbc314e",
                 "218ef98dfaf077c22c5eaa745a00f142"],
    "collect_id": ["pe2c334e51f7983d5", "p77de26167d6770d9", "p9c35bbb221b717ed"],
    "dataset_id": ["307620786386", "10145a8df85e", "01057ab9a7d4"],
}


@pytest.mark.parametrize("scheme", list(PERSISTED))
def test_hashes_equal_the_persisted_values(scheme):
    assert [prompt_hash(p, scheme) for p in (TEXT, CHAT, SPACES)] == PERSISTED[scheme]


def test_features_hash_reads_role_and_content_only_and_tells_text_from_one_message():
    assert prompt_hashes([TEXT, CHAT]) == PERSISTED["features"][:2]
    with_name = [{**CHAT[0], "name": "x"}, CHAT[1]]
    assert prompt_hash(with_name) == prompt_hash(CHAT)
    assert prompt_hash(TEXT) != prompt_hash([{"role": "user", "content": TEXT}])
    assert prompt_hash("\ud800") == prompt_hash("\ud800")  # a lone surrogate hashes (surrogatepass)


def test_stages_derive_their_ids_from_the_one_hash(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": TEXT, "answer": "391"}) + "\n"
                       + json.dumps({"messages": CHAT, "answer": "x"}) + "\n")
    assert [i.prompt_id for i in read_prompts(prompts)] == PERSISTED["collect_id"][:2]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "target": "a", "score": 1}) for p in (TEXT, CHAT)))
    assert read_routing_data(data).prompt_ids == PERSISTED["dataset_id"][:2]


def test_as_prompt_turns_openai_content_into_text():
    messages = [{"role": "system", "content": "be brief", "name": "ops"},
                {"role": "user", "content": [{"type": "text", "text": "what is"},
                                             {"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "2+2?"}]},
                {"role": "assistant", "content": None, "tool_calls": []}]
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is\n2+2?"},
                {"role": "assistant", "content": ""}]
    assert as_prompt(messages) == expected
    assert as_prompt(tuple(messages)) == expected
    assert as_prompt(TEXT) is TEXT
    assert prompt_text(messages) == "be brief\nwhat is\n2+2?"
    assert prompt_text({"role": "user", "content": "hi"}) == "hi"
    assert as_prompt([]) == []  # emptiness is check_prompt's rule


@pytest.mark.parametrize("bad, words", [
    (5, "text or a list of chat messages, got int"),
    (["hi"], "messages[0] must be an object"),
    ([CHAT[0], {"content": "x"}], "messages[1].role must be a non-empty string"),
    ([{"role": "", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string, a list of parts, or null"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content[0] must be an object"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text must be a string"),
    ("  \n", "empty prompt"),
    ([], "empty prompt: a non-empty list"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": None}], "the messages hold no text"),
])
def test_check_prompt_names_the_offending_field(bad, words):
    with pytest.raises(DataError) as info:
        check_prompt(bad)
    assert words in str(info.value)


def test_each_stage_reports_the_same_rule_in_its_own_terms(tmp_path):
    bad = [{"role": "user", "content": 5}]
    with pytest.raises(BadMessages, match=r"messages\[0\]\.content") as gateway:
        routing_messages(bad)
    assert isinstance(gateway.value, DataError)  # the gateway's 400 is the data error, named
    with pytest.raises(Exception, match=r"prompt at row 4: messages\[0\]\.content"):
        as_messages(bad, 4)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt_id": "q", "messages": bad}) + "\n")
    with pytest.raises(DataError) as info:
        read_prompts(path)
    assert info.value.line == 1 and info.value.field == "messages" and "messages[0].content" in str(info.value)
    # The gateway drops messages with no text; the dataset keeps them (its hashes were made with them).
    chat = [{"role": "assistant", "content": None}, {"role": "user", "content": "hi"}]
    assert routing_messages(chat) == [{"role": "user", "content": "hi"}]
    assert check_prompt(chat) == [{"role": "assistant", "content": ""}, {"role": "user", "content": "hi"}]
