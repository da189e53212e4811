"""data.py: token ids and masks against transformers' apply_chat_template, bad rows, length rules,
atomic and idempotent output, Hub-layout inputs, the CLI, and the batch loader against the Parquet rows."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from _data_templates import ALTERNATING, CHATML_GENERATION, FAMILIES, WORDS, build_tokenizer
from jinja2.sandbox import ImmutableSandboxedEnvironment

import data

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = [  # (prompt turns, chosen reply, rejected reply)
    ([SYSTEM, {"role": "user", "content": "What is the time?"}], "It is day, I think.", "No idea."),
    ([{"role": "user", "content": "Say one word"}], "water", "Two words"),
    (
        [
            SYSTEM,
            {"role": "user", "content": "Name a thing."},
            {"role": "assistant", "content": "A long thing\nwith two lines."},
            {"role": "user", "content": "Another? ünïcode 😀"},
        ],
        "people 😀 ok",
        "the way about many",
    ),
    (
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second"},
        ],
        "two, then three!",
        "no",
    ),
    ([{"role": "user", "content": "Pad it"}], "padded reply  ", "no"),  # Llama 3.1's template trims content
]


def conversation_rows():
    return [
        {
            "chosen": p + [{"role": "assistant", "content": c}],
            "rejected": p + [{"role": "assistant", "content": r}],
        }
        for p, c, r in CONVERSATIONS
    ]


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    for family in FAMILIES:
        build_tokenizer(root / family, family)
    return root


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_rows(output: Path) -> list[dict]:
    """The output's rows straight from Parquet (pyarrow, not our loader)."""
    tables = [pq.read_table(f) for f in sorted(output.glob("part-*.parquet"))]
    return pa.concat_tables(tables).to_pylist()


def scored_runs(ids, mask) -> list[list[int]]:
    runs, run = [], []
    for token, scored in zip(ids, mask, strict=True):
        if scored:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


def hf_ids(hf, messages):
    return list(hf.apply_chat_template(messages, tokenize=True)["input_ids"])


# --- chat templates and masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_match_transformers_and_masks_cover_assistant_turns(family, tokenizers_dir, tmp_path):
    directory = tokenizers_dir / family
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    end_of_turn = FAMILIES[family][4]
    chat = data.ChatTokenizer(str(directory))
    for prompt, _, _ in CONVERSATIONS:  # the rendered text, with and without the generation prompt
        for generation in (False, True):
            expected = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=generation)
            assert chat.render(prompt, generation) == expected

    rows = conversation_rows()
    inputs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    summary = data.tokenize(inputs, str(directory), str(tmp_path / "out"))
    every = data.tokenize(inputs, str(directory), str(tmp_path / "all"), scored_turns="all")
    assert summary["format"] == "conversation" and summary["rows_written"] == len(rows)
    assert summary["settings"]["scored_turns"] == "reply" and every["settings"]["scored_turns"] == "all"
    outputs = zip(read_rows(tmp_path / "out"), read_rows(tmp_path / "all"), strict=True)
    for row, (out, out_all) in zip(rows, outputs, strict=True):
        assert out_all["prompt_length"] == out["prompt_length"]
        for side in ("chosen", "rejected"):
            ids, mask = out[f"{side}_input_ids"], out[f"{side}_loss_mask"]
            assert ids == hf_ids(hf, row[side]) == out_all[f"{side}_input_ids"]
            assert out[f"{side}_length"] == len(ids)
            # the template's own BOS tokens (Llama 2: one a turn), and no more
            if "bos_token" in FAMILIES[family][0]:
                text = hf.apply_chat_template(row[side], tokenize=False)
                assert ids.count(hf.bos_token_id) == text.count(hf.bos_token) and ids[0] == hf.bos_token_id
            decoded = [hf.decode(run) for run in scored_runs(ids, mask)]
            trims = "| trim" in FAMILIES[family][0] or "content.strip()" in FAMILIES[family][0]
            assistant = [
                m["content"].strip() if trims else m["content"] for m in row[side] if m["role"] == "assistant"
            ]
            assert decoded == [assistant[-1] + end_of_turn]  # by default the reply only (TRL)
            # scored_turns all: every assistant turn, the prompt's too (Marin)
            decoded = [hf.decode(run) for run in scored_runs(ids, out_all[f"{side}_loss_mask"])]
            assert decoded == [content + end_of_turn for content in assistant]
        # Each reply is scored from the token after the prompt rendered with the generation prompt (Llama 2:
        # from the "▁" after [/INST], a piece of its own before a digit, an emoji or a rare word).
        n = len(hf.apply_chat_template(row["chosen"][:-1], add_generation_prompt=True)["input_ids"])
        assert out["prompt_length"] == n
        for side in ("chosen", "rejected"):
            assert out[f"{side}_loss_mask"][n - 1 : n + 1] == [0, 1]


def test_gemma2_rejects_a_system_turn_with_the_templates_message_and_scores_as_transformers(tmp_path):
    """Gemma 2's template raises on a system turn (raise_exception): those rows go to rejects.jsonl with the
    template's own message; the others, multi-turn among them, get apply_chat_template's tokens, and each
    side scores its reply and the reply's <end_of_turn>."""
    directory = build_tokenizer(tmp_path / "gemma2", "gemma2")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    rows = conversation_rows()
    data.tokenize(write_jsonl(tmp_path / "pairs.jsonl", rows), str(directory), str(tmp_path / "out"))
    system = [i for i, row in enumerate(rows) if row["chosen"][0]["role"] == "system"]
    with pytest.raises(jinja2.TemplateError) as raised:  # transformers' own message
        hf.apply_chat_template(rows[system[0]]["chosen"])
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejects] == [(i, "template error") for i in system]
    assert {r["detail"] for r in rejects} == {f"TemplateError: {raised.value}"}
    kept = [row for i, row in enumerate(rows) if i not in system]
    assert any(len(row["chosen"]) > 2 for row in kept)  # multi-turn
    for row, out in zip(kept, read_rows(tmp_path / "out"), strict=True):
        prompt = hf.apply_chat_template(row["chosen"][:-1], add_generation_prompt=True)["input_ids"]
        assert out["prompt_length"] == len(prompt)
        for side in ("chosen", "rejected"):
            ids, mask = out[f"{side}_input_ids"], out[f"{side}_loss_mask"]
            assert ids == hf_ids(hf, row[side])
            reply = row[side][-1]["content"].strip() + "<end_of_turn>"
            assert [hf.decode(run) for run in scored_runs(ids, mask)] == [reply]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_qwen3_thinking_template_kwargs_and_tools_match_transformers(tmp_path):
    """Qwen3's template: the reply carries a <think> block (empty unless the reply has one), which is the
    model's to write and so scored; with chat_template_kwargs {"enable_thinking": false} (TRL's and
    transformers' keyword) the empty block is in the generation prompt instead, not scored. A row's tools
    go to the template as apply_chat_template's tools= (a list, or the list as JSON text)."""
    directory = build_tokenizer(tmp_path / "qwen3", "qwen3")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    user = {"role": "user", "content": "What is the weather in Paris?"}
    reasoned = "<think>\nThe user asks for the weather.\n</think>\n\nIt is sunny."
    reply = lambda content: {"role": "assistant", "content": content}
    rows = [
        {"chosen": [user, reply(reasoned)], "rejected": [user, reply("No idea.")]},
        {"chosen": [SYSTEM, user, reply("Sunny.")], "rejected": [SYSTEM, user, reply("Rain.")]},
        {"chosen": [user, reply("Sunny.")], "rejected": [user, reply("Rain.")]},
    ]
    rows[1]["tools"], rows[2]["tools"] = [WEATHER_TOOL], json.dumps([WEATHER_TOOL])  # a list, or JSON text
    inputs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for kwargs in ({}, {"enable_thinking": False}):
        out = tmp_path / f"out-{len(kwargs)}"
        data.tokenize(inputs, str(directory), str(out), chat_template_kwargs=json.dumps(kwargs))
        # Thinking off, a reply with a thought contradicts the prompt's empty block: rejected (not a prefix).
        kept = rows[1:] if kwargs else rows
        assert len(read_rows(out)) == len(kept)
        for row, written in zip(kept, read_rows(out), strict=True):
            tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
            options = dict(tools=tools, **kwargs)
            prompt = hf.apply_chat_template(row["chosen"][:-1], add_generation_prompt=True, **options)
            assert written["prompt_length"] == len(prompt["input_ids"])
            for side in ("chosen", "rejected"):
                ids, mask = written[f"{side}_input_ids"], written[f"{side}_loss_mask"]
                assert ids == list(hf.apply_chat_template(row[side], **options)["input_ids"])
                content = row[side][-1]["content"]
                thought = "" if "<think>" in content else "<think>\n\n</think>\n\n"
                expected = content + "<|im_end|>" if kwargs else thought + content + "<|im_end|>"
                assert hf.decode([t for t, m in zip(ids, mask, strict=True) if m]) == expected
            assert ("get_weather" in hf.decode(written["chosen_input_ids"])) == bool(tools)


def test_qwen25_tools_column_matches_transformers(tokenizers_dir, tmp_path):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "qwen25")
    rows = [dict(row, tools=[WEATHER_TOOL]) for row in conversation_rows()]
    data.tokenize(
        write_jsonl(tmp_path / "pairs.jsonl", rows), str(tokenizers_dir / "qwen25"), str(tmp_path / "out")
    )
    for row, out in zip(rows, read_rows(tmp_path / "out"), strict=True):
        for side in ("chosen", "rejected"):
            assert out[f"{side}_input_ids"] == list(
                hf.apply_chat_template(row[side], tools=row["tools"])["input_ids"]
            )
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], tools="not json"), dict(rows[1], tools=[1])])
    with pytest.raises(ValueError):
        data.tokenize(bad, str(tokenizers_dir / "qwen25"), str(tmp_path / "bad"))
    reasons = [
        json.loads(line)["reason"] for line in (tmp_path / "bad.rejects.jsonl").read_text().splitlines()
    ]
    assert reasons == ["wrong type", "wrong type"]
    with pytest.raises(ValueError, match="^chat_template_kwargs '\\[1\\]' is not a JSON object"):
        data.tokenize(bad, str(tokenizers_dir / "qwen25"), str(tmp_path / "x"), chat_template_kwargs="[1]")


def test_mask_matches_transformers_generation_markers(tokenizers_dir, tmp_path):
    """With {% generation %} markers around content + <|im_end|>, transformers' own assistant mask (every
    assistant turn: Marin's rule) is an independent reference for the prefix-render mask (which ignores the
    markers) with scored_turns all; by default the same mask from the reply on."""
    template = tmp_path / "chatml_generation.jinja"
    template.write_text(CHATML_GENERATION)
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "chatml")
    rows = conversation_rows()
    inputs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer, settings = str(tokenizers_dir / "chatml"), dict(chat_template=str(template))
    data.tokenize(inputs, tokenizer, str(tmp_path / "all"), scored_turns="all", **settings)
    data.tokenize(inputs, tokenizer, str(tmp_path / "reply"), **settings)
    outputs = zip(read_rows(tmp_path / "all"), read_rows(tmp_path / "reply"), strict=True)
    for row, (every, reply) in zip(rows, outputs, strict=True):
        reference = hf.apply_chat_template(
            row["chosen"],
            chat_template=CHATML_GENERATION,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert every["chosen_input_ids"] == reply["chosen_input_ids"] == list(reference["input_ids"])
        assert every["chosen_loss_mask"] == list(reference["assistant_masks"])
        n = reply["prompt_length"]
        assert reply["chosen_loss_mask"] == [0] * n + list(reference["assistant_masks"])[n:]
    assert any(0 < sum(r["chosen_loss_mask"][: r["prompt_length"]]) for r in read_rows(tmp_path / "all"))
    # The setting is the output's: another one is a new tokenization, never mixed into an earlier output.
    with pytest.raises(ValueError, match="other scored_turns; pass --overwrite"):
        data.tokenize(inputs, tokenizer, str(tmp_path / "reply"), scored_turns="all", **settings)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_default_scores_the_reply_as_trl_does(family, tokenizers_dir, tmp_path):
    """TRL's rule for conversational pairs, written out: the prompt is apply_chat_template(prompt,
    add_generation_prompt=True), the completion whatever follows it in apply_chat_template(prompt + reply),
    and the completion is what is scored. data.py's default scores the same tokens from the same position,
    through the reply's end-of-turn token; what TRL scores past that is template text between turns (a
    newline), which the model never has to write. Earlier assistant turns are prompt: not scored."""
    directory = tokenizers_dir / family
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    rows = conversation_rows()
    data.tokenize(write_jsonl(tmp_path / "pairs.jsonl", rows), str(directory), str(tmp_path / "out"))
    for row, out in zip(rows, read_rows(tmp_path / "out"), strict=True):
        for side in ("chosen", "rejected"):
            prompt = hf.apply_chat_template(row[side][:-1], add_generation_prompt=True)["input_ids"]
            full = hf_ids(hf, row[side])
            assert full[: len(prompt)] == prompt  # TRL slices the completion off this prefix
            completion = full[len(prompt) :]
            ids, mask = out[f"{side}_input_ids"], out[f"{side}_loss_mask"]
            assert ids == full and out["prompt_length"] == len(prompt)
            assert not any(mask[: len(prompt)])
            scored = sum(mask)
            assert mask[len(prompt) :] == [1] * scored + [0] * (len(completion) - scored)
            assert completion[scored - 1] in hf.all_special_ids  # through the end-of-turn token
            assert hf.decode(completion[scored:]).strip() == ""  # and what follows is whitespace


# Exercises the globals and filters transformers gives templates, which the model templates above do not.
TEMPLATE_GLOBALS = (
    "{%- set ns = namespace(system=false) -%}"
    "{%- for m in messages if m.role == 'system' %}{% set ns.system = true %}{% endfor -%}"
    "{{ dict(system=ns.system, turns=messages | length) | tojson }}|"
    "{{ dict.fromkeys(['a'], 0) | tojson(indent=2) }}"
    "|{{ strftime_now('%Y') }}\n{% for message in messages %}{% if loop.index0 > 4 %}{% break %}{% endif %}"
    "<|im_start|>{{ message.role }}\n{% if message.role == 'assistant' %}"
    "{% generation %}{{ message.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message.content | tojson }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_globals_and_filters_match_transformers(tokenizers_dir, tmp_path):
    template = tmp_path / "globals.jinja"
    template.write_text(TEMPLATE_GLOBALS)
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "chatml")
    chat = data.ChatTokenizer(str(tokenizers_dir / "chatml"), chat_template=str(template))
    messages = [
        SYSTEM,
        {"role": "user", "content": "<b>&ünïcode</b>"},
        {"role": "assistant", "content": "ok"},
    ]
    for generation in (False, True):
        expected = hf.apply_chat_template(
            messages, chat_template=TEMPLATE_GLOBALS, tokenize=False, add_generation_prompt=generation
        )
        assert chat.render(messages, generation) == expected
    (tmp_path / "escape.jinja").write_text("{% set ns = namespace(_secret=1) %}{{ messages[0].content }}")
    with pytest.raises(data.RejectedRow, match="template error"):
        data.ChatTokenizer(str(tokenizers_dir / "chatml"), str(tmp_path / "escape.jinja")).render(messages)


def test_templates_cannot_rewrite_the_messages_through_dict(tokenizers_dir, tmp_path):
    """The sandbox alone hands templates the dict type, whose unbound update() it does not guard, so a
    template could rewrite the messages between the renders of one pair; data.py refuses it, as transformers
    does (its TemplateDict)."""
    source = "{% set _ = dict.update(messages[0], {'content': 'rewritten'}) %}{{ messages[0].content }}"
    unguarded = [{"role": "user", "content": "original"}]
    assert ImmutableSandboxedEnvironment().from_string(source).render(messages=unguarded) == "rewritten"
    assert unguarded[0]["content"] == "rewritten"
    (tmp_path / "rewrite.jinja").write_text(source)
    messages = [{"role": "user", "content": "original"}]
    with pytest.raises(data.RejectedRow, match="template error"):
        data.ChatTokenizer(str(tokenizers_dir / "chatml"), str(tmp_path / "rewrite.jinja")).render(messages)
    assert messages[0]["content"] == "original"


def test_prompt_completion_rows(tokenizers_dir, tmp_path):
    directory = str(tokenizers_dir / "llama31")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    prompt = [SYSTEM, {"role": "user", "content": "What is the time?"}]
    as_messages = {  # TRL's conversational format with an explicit prompt
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "day"}],
        "rejected": [{"role": "assistant", "content": "night"}],
    }
    as_strings = {"prompt": "What is the time?", "chosen": "day", "rejected": "night"}
    summary = data.tokenize(write_jsonl(tmp_path / "a.jsonl", [as_messages]), directory, str(tmp_path / "a"))
    assert summary["format"] == "prompt_completion"
    (row,) = read_rows(tmp_path / "a")
    assert row["chosen_input_ids"] == hf_ids(hf, prompt + as_messages["chosen"])
    assert row["rejected_input_ids"] == hf_ids(hf, prompt + as_messages["rejected"])
    # plain strings go through the chat template when asked to (auto would read them as `plain`)
    inputs = write_jsonl(tmp_path / "b.jsonl", [as_strings])
    data.tokenize(inputs, directory, str(tmp_path / "b"), format="prompt_completion")
    (row,) = read_rows(tmp_path / "b")
    assert row["chosen_input_ids"] == hf_ids(hf, [prompt[1], {"role": "assistant", "content": "day"}])
    # a named field adds each row's system prompt
    inputs = write_jsonl(tmp_path / "c.jsonl", [as_strings | {"system": SYSTEM["content"]}])
    data.tokenize(inputs, directory, str(tmp_path / "c"), format="prompt_completion", system_field="system")
    (row,) = read_rows(tmp_path / "c")
    assert row["chosen_input_ids"] == hf_ids(hf, prompt + [{"role": "assistant", "content": "day"}])


def test_plain_rows_use_the_tokenizers_bos_and_eos(tmp_path):
    """A base model: no chat template; the tokenizer's post-processor adds BOS, responses end with EOS."""
    directory = build_tokenizer(tmp_path / "base", "llama31", template=None, bos_processor=True)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    rows = [{"prompt": "Question: what is the time?", "chosen": " day.", "rejected": " night or day."}]
    summary = data.tokenize(write_jsonl(tmp_path / "p.jsonl", rows), str(directory), str(tmp_path / "out"))
    assert summary["format"] == "plain"
    (out,) = read_rows(tmp_path / "out")
    prompt = hf(rows[0]["prompt"])["input_ids"]
    assert prompt[0] == hf.bos_token_id
    for side in ("chosen", "rejected"):
        response = hf(rows[0][side], add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        assert out[f"{side}_input_ids"] == prompt + response
        assert out[f"{side}_loss_mask"] == [0] * len(prompt) + [1] * len(response)
    assert out["prompt_length"] == len(prompt)
    with pytest.raises(ValueError, match="no chat template"):
        data.tokenize(
            write_jsonl(tmp_path / "c.jsonl", conversation_rows()), str(directory), str(tmp_path / "c")
        )


def trl_extract_dialogue(example: dict) -> dict:
    """TRL's hh-rlhf conversion (trl/examples/datasets/hh-rlhf-helpful-base.py), written out: the prompt is
    the two transcripts' common start up to its last Assistant turn, split into turns; each reply the rest."""
    chosen, rejected, marker = example["chosen"], example["rejected"], "\n\nAssistant: "
    same = itertools.takewhile(lambda ab: ab[0] == ab[1], zip(chosen, rejected, strict=False))
    prompt = "".join(a for a, _ in same)  # their common start
    if not prompt.endswith(marker):
        prompt = prompt[: prompt.rfind(marker)] + marker
    chosen_line, rejected_line = chosen[len(prompt) :], rejected[len(prompt) :]
    lines = re.split(r"(\n\nAssistant: |\n\nHuman: )", prompt[: -len(marker)])[1:]
    turns = [
        {"role": "user" if lines[i] == "\n\nHuman: " else "assistant", "content": lines[i + 1]}
        for i in range(0, len(lines), 2)
    ]
    reply = lambda text: [{"role": "assistant", "content": text}]
    return {"prompt": turns, "chosen": reply(chosen_line), "rejected": reply(rejected_line)}


def test_hh_rlhf_transcripts_tokenize_as_trls_conversion_and_malformed_ones_are_rejected(
    tokenizers_dir, tmp_path
):
    """Anthropic/hh-rlhf as published: two strings a row, each a whole dialogue. The shared turns are the
    prompt and each side's last Assistant turn its reply, the same tokens as TRL's conversion gives; a
    transcript without a final Assistant turn, with other earlier turns or not starting with a turn is
    rejected with its reason."""
    h, a = "\n\nHuman: ", "\n\nAssistant: "
    history = f"{h}What is a cat?{a}An animal.{h}And a dog?"
    good = [
        {"chosen": f"{h}Hi there{a}Hello! How can I help?", "rejected": f"{h}Hi there{a}Go away."},
        {
            "chosen": f"{history}{a}Also an animal.",
            "rejected": f"{history}{a}Also a plant.",
        },  # shared history
        {
            "chosen": f"{h}Name a color{a}Red, like a rose.",
            "rejected": f"{h}Name a color{a}Red.",
        },  # same start
    ]
    bad = [
        {"chosen": f"{h}Hi{a}Hello.{h}Thanks", "rejected": f"{h}Hi{a}Bye."},  # no final Assistant turn
        {"chosen": f"{h}Hi{a}Hello.", "rejected": f"{h}Hey{a}Bye."},  # other earlier turns
        {"chosen": f"Hi{a}Hello.", "rejected": f"Hi{a}Bye."},  # text before the first turn
    ]
    tokenizer, ours, theirs = str(tokenizers_dir / "llama31"), tmp_path / "ours", tmp_path / "theirs"
    summary = data.tokenize(write_jsonl(tmp_path / "hh.jsonl", good + bad), tokenizer, str(ours))
    converted = write_jsonl(tmp_path / "trl.jsonl", map(trl_extract_dialogue, good))
    data.tokenize(converted, tokenizer, str(theirs))
    assert summary["format"] == "transcript" and summary["rows_written"] == len(good)
    sides = ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask")
    for got, want in zip(read_rows(ours), read_rows(theirs), strict=True):
        assert [got[k] for k in sides] == [want[k] for k in sides]
    rejects = [json.loads(line) for line in (ours / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["no assistant turn", "prompt differs", "malformed transcript"]


# --- bad rows and errors -----------------------------------------------------------------------------------


def test_bad_rows_are_listed_and_good_rows_kept(tokenizers_dir, tmp_path):
    template = tmp_path / "alternating.jinja"
    template.write_text(ALTERNATING)
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    other = {"role": "assistant", "content": "go away"}

    def pair(chosen, rejected):
        return {"chosen": chosen, "rejected": rejected}

    rows = [
        {"chosen": [user, reply]},
        pair(5, [user, other]),
        pair([user, {"role": "assistant", "content": 3}], [user, other]),
        pair([user, {"role": "assistant", "content": "  "}], [user, other]),
        pair([user, {"role": "assistant", "content": None}], [user, other]),
        pair([{"role": "narrator", "content": "x"}, reply], [user, other]),
        pair([user], [user]),
        pair([user, reply], [user, reply]),
        pair([user, user, reply], [user, user, other]),  # the template raises: roles do not alternate
        pair([user, reply], [{"role": "user", "content": "bye"}, other]),
        "{not json",
        pair([user, reply], [user, other]),  # good
        pair([user, reply, user, other], [user, reply, user, reply]),  # good, multi-turn
    ]
    expected = {
        0: "missing field",
        1: "wrong type",
        2: "wrong type",
        3: "empty content",
        4: "empty content",
        5: "unknown role",
        6: "no assistant turn",
        7: "chosen equals rejected",
        8: "template error",
        9: "prompt differs",
        10: "invalid JSON",
    }
    inputs, output = write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "out"
    # row groups of 1 pair: rows are read 8 at a time, so the first chunk has no usable row at all
    tokenizer = str(tokenizers_dir / "llama31")
    summary = data.tokenize(inputs, tokenizer, str(output), chat_template=str(template), row_group_size=1)
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    assert {r["index"]: r["reason"] for r in rejects} == expected
    assert "must alternate" in rejects[8]["detail"]
    assert rejects[10]["detail"].startswith("rows.jsonl line 11: ")  # the file and line of a bad line
    assert summary["rows_read"] == len(rows) and summary["rows_written"] == 2
    assert sum(summary["rows_dropped"].values()) == len(expected)
    assert [r["source_index"] for r in read_rows(output)] == [11, 12]


def test_unknown_columns_and_no_usable_row_name_the_formats(tokenizers_dir, tmp_path):
    tokenizer = str(tokenizers_dir / "llama31")
    with pytest.raises(ValueError, match="match no format") as error:
        data.tokenize(
            write_jsonl(tmp_path / "a.jsonl", [{"text": "hi", "label": 1}]), tokenizer, str(tmp_path / "a")
        )
    assert all(name in str(error.value) for name in [*data.FORMATS, "text", "label"])
    rows = [
        {"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "yo"}]}
    ] * 3
    with pytest.raises(ValueError, match="no usable row in 3 rows") as error:
        data.tokenize(write_jsonl(tmp_path / "b.jsonl", rows), tokenizer, str(tmp_path / "b"))
    assert "3 no assistant turn" in str(error.value) and "chosen, rejected" in str(error.value)
    assert not (tmp_path / "b").exists()
    # The reasons reach the user: the first ones in the message, all of them beside the output.
    assert "row 0: no assistant turn (chosen does not end with an assistant turn)" in str(error.value)
    kept = tmp_path / "b.rejects.jsonl"
    assert str(kept) in str(error.value) and len(kept.read_text().splitlines()) == 3


def test_null_columns_and_missing_ones_are_named(tokenizers_dir, tmp_path):
    """Columns that are there but hold only nulls, or a side's column not there: said so (not just "match no
    format"), from .jsonl and Parquet alike; a null prompt is "null", not "missing"."""
    tokenizer = str(tokenizers_dir / "llama31")
    rows = [{"prompt": "What is 1+1?", "chosen": None, "rejected": None}] * 3
    pq.write_table(
        pa.Table.from_pylist(rows, pa.schema([(k, pa.string()) for k in rows[0]])), tmp_path / "a.parquet"
    )
    for name in (write_jsonl(tmp_path / "a.jsonl", rows), str(tmp_path / "a.parquet")):
        with pytest.raises(ValueError, match="chosen and rejected are null in all of the first 3 rows"):
            data.tokenize(name, tokenizer, str(tmp_path / "out"))
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "chosen": "a"}]), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="there is no rejected column.*Columns found: prompt, chosen$"):
        data.tokenize(str(tmp_path / "b.parquet"), tokenizer, str(tmp_path / "out"))
    rows = [{"prompt": None, "chosen": "2", "rejected": "3"}, {"chosen": "2", "rejected": "3"}]
    rows.append({"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"})
    data.tokenize(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, str(tmp_path / "c"), format="plain")
    rejects = [json.loads(line) for line in (tmp_path / "c" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["detail"]) for r in rejects] == [
        ("missing field", "prompt is null"),
        ("missing field", "prompt is missing"),
    ]


def test_parquet_text_typed_binary_is_read_as_utf8_text(tokenizers_dir, tmp_path):
    """Parquet writers that type text columns binary (bytes): valid UTF-8 is the same text, in plain and in
    chat-message columns; bytes that are not UTF-8 reject their row, naming the column and its type (before:
    "the columns match no format ... Columns found: prompt, chosen, rejected", the very columns expected)."""
    tokenizer = str(tokenizers_dir / "llama31")
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i} ünï", "rejected": f"Bad {i}"} for i in range(4)]
    text = write_jsonl(tmp_path / "text.jsonl", rows)
    as_bytes = [{k: v.encode() for k, v in row.items()} for row in rows]
    as_bytes[2]["chosen"] = b"caf\xe9"  # Latin-1, not UTF-8
    schema = pa.schema([(k, pa.binary()) for k in rows[0]])
    pq.write_table(pa.Table.from_pylist(as_bytes, schema), tmp_path / "b.parquet")
    data.tokenize(text, tokenizer, str(tmp_path / "want"), format="plain")
    got = data.tokenize(str(tmp_path / "b.parquet"), tokenizer, str(tmp_path / "got"))
    assert got["format"] == "plain" and got["rows_written"] == 3
    tokens = lambda r: {k: v for k, v in r.items() if k not in ("source_index", "first_copy")}  # rows apart
    want = read_rows(tmp_path / "want")
    assert [tokens(r) for r in read_rows(tmp_path / "got")] == [tokens(want[i]) for i in (0, 1, 3)]
    (reject,) = [json.loads(line) for line in (tmp_path / "got" / "rejects.jsonl").read_text().splitlines()]
    assert reject["index"] == 2 and reject["reason"] == "invalid text"
    assert "chosen" in reject["detail"] and "binary" in reject["detail"] and "UTF-8" in reject["detail"]
    # Chat messages whose role and content are binary, in a large_binary list of structs.
    turn = pa.struct([("role", pa.binary()), ("content", pa.large_binary())])
    encoded = lambda turns: [{"role": m["role"].encode(), "content": m["content"].encode()} for m in turns]
    chats = [{k: encoded(turns) for k, turns in row.items()} for row in conversation_rows()]
    schema = pa.schema([(k, pa.list_(turn)) for k in ("chosen", "rejected")])
    pq.write_table(pa.Table.from_pylist(chats, schema), tmp_path / "c.parquet")
    chat = write_jsonl(tmp_path / "chat.jsonl", conversation_rows())
    data.tokenize(chat, tokenizer, str(tmp_path / "want-chat"))
    data.tokenize(str(tmp_path / "c.parquet"), tokenizer, str(tmp_path / "got-chat"))
    assert read_rows(tmp_path / "got-chat") == read_rows(tmp_path / "want-chat")
    # Values of a type that is no text at all: the message says which types it found.
    numbers = pa.Table.from_pylist([{"prompt": "x", "chosen": 1, "rejected": 2}])
    pq.write_table(numbers, tmp_path / "i.parquet")
    with pytest.raises(ValueError, match=r"\(prompt holds str, chosen holds int, rejected holds int\)"):
        data.tokenize(str(tmp_path / "i.parquet"), tokenizer, str(tmp_path / "out"))


def test_unreadable_rows_and_files_are_named(tokenizers_dir, tmp_path):
    tokenizer, good = str(tokenizers_dir / "llama31"), json.dumps(conversation_rows()[0]).encode()
    # A byte that is not UTF-8 and a line cut short: those rows are rejected, naming file and line.
    (tmp_path / "rows.jsonl").write_bytes(
        b"\n".join([good, b'{"chosen": "caf\xe9"}', good, b'{"chosen": [', good])
    )
    summary = data.tokenize(str(tmp_path / "rows.jsonl"), tokenizer, str(tmp_path / "out"))
    assert summary["rows_written"] == 3 and summary["rows_dropped"] == {"invalid JSON": 2}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["detail"].split(":")[0] for r in rejects] == ["rows.jsonl line 2", "rows.jsonl line 4"]
    (tmp_path / "cut.json").write_text(json.dumps(conversation_rows())[:-20])
    with pytest.raises(ValueError, match="cut.json: not a valid JSON array"):
        data.tokenize(str(tmp_path / "cut.json"), tokenizer, str(tmp_path / "cut"))
    # No rows at all: said so, not "the columns match no format".
    (tmp_path / "empty.jsonl").write_text("")
    no_rows = pa.table({"chosen": pa.array([], pa.string()), "rejected": pa.array([], pa.string())})
    pq.write_table(no_rows, tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "empty.parquet"):
        with pytest.raises(ValueError, match=f"{name} has no rows"):
            data.tokenize(str(tmp_path / name), tokenizer, str(tmp_path / "none"))


def test_a_lone_surrogate_rejects_its_row_and_the_rest_is_tokenized(tokenizers_dir, tmp_path):
    """JSON can spell a lone UTF-16 surrogate (scraped data has them), which is no Unicode text: that row goes
    to rejects.jsonl with its reason, in the plain and the chat formats; the chunk's other rows are kept."""
    tokenizer = str(tokenizers_dir / "llama31")
    plain = [{"prompt": "What is 1+1?", "chosen": "2 \ud800", "rejected": "3"}]
    plain += [{"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}]
    chat = conversation_rows()
    chat[1]["rejected"][-1]["content"] += " \udfff"
    for name, rows, where in [("plain", plain, "chosen"), ("chat", chat, "the rejected conversation")]:
        inputs = tmp_path / f"{name}.jsonl"
        write_jsonl(inputs, rows)
        assert "\\ud" in inputs.read_text()  # as JSON spells it
        summary = data.tokenize(str(inputs), tokenizer, str(tmp_path / name))
        assert summary["rows_written"] == len(rows) - 1 and summary["rows_dropped"] == {"invalid text": 1}
        (reject,) = [
            json.loads(line) for line in (tmp_path / name / "rejects.jsonl").read_text().splitlines()
        ]
        assert reject["index"] == (0 if name == "plain" else 1) and reject["reason"] == "invalid text"
        assert (
            reject["detail"].startswith(f"{where} holds '\\ud")
            and "lone UTF-16 surrogate" in reject["detail"]
        )


def test_a_prompt_field_is_never_dropped_and_identical_tokens_are_rejected(tokenizers_dir, tmp_path):
    tokenizer = str(tokenizers_dir / "llama31")
    user, system = {"role": "user", "content": "What is the capital of France?"}, SYSTEM
    reply = lambda text: {"role": "assistant", "content": text}
    rows = [
        {
            "prompt": user["content"],
            "chosen": [user, reply("Paris")],
            "rejected": [user, reply("Rome")],
        },  # kept
        # The prompt lives only in its field; the conversations hold a system turn: it would be lost.
        {"prompt": user["content"], "chosen": [system, reply("Paris")], "rejected": [system, reply("Rome")]},
        # Different as text, the same as tokens: Llama 3.1's template trims the content.
        {"prompt": user["content"], "chosen": [user, reply("Paris.")], "rejected": [user, reply("Paris. ")]},
    ]
    summary = data.tokenize(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer, str(tmp_path / "out"))
    assert summary["format"] == "conversation" and summary["rows_written"] == 1
    assert summary["rows_dropped"] == {"prompt not in conversation": 1, "identical after tokenization": 1}
    # Forced to the conversation format, a row whose turns hold no prompt but whose field does: rejected.
    forced = [{"prompt": "Hi?", "chosen": [reply("a")], "rejected": [reply("b")]}, rows[0]]
    summary = data.tokenize(
        write_jsonl(tmp_path / "forced.jsonl", forced),
        tokenizer,
        str(tmp_path / "forced"),
        format="conversation",
    )
    assert summary["rows_dropped"] == {"prompt not in conversation": 1} and summary["rows_written"] == 1


def test_a_killed_run_leaves_nothing_behind_and_outputs_get_the_usual_permissions(tokenizers_dir, tmp_path):
    leftover = tmp_path / ".out.dpo-tmp"  # what a kill during tokenization leaves
    leftover.mkdir()
    (leftover / "part-00000.parquet").write_text("half")
    inputs = write_jsonl(tmp_path / "rows.jsonl", conversation_rows())
    data.tokenize(inputs, str(tokenizers_dir / "chatml"), str(tmp_path / "out"))
    assert not leftover.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_current_folder_as_output_is_filled_in_place(tokenizers_dir, tmp_path, monkeypatch):
    """--output . (or ./) in an empty folder, as --help allows: the files appear in the folder the user is in,
    which stays that folder (replaced whole, the user's shell would be left in a deleted one); a rerun
    with other settings and --overwrite replaces them there."""
    inputs = write_jsonl(tmp_path / "rows.jsonl", conversation_rows())
    tokenizer = str(tokenizers_dir / "chatml")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    folder = os.stat(".").st_ino
    first = data.tokenize(inputs, tokenizer, ".")
    assert os.stat(".").st_ino == folder and sorted(os.listdir(".")) == [
        "part-00000.parquet",
        "rejects.jsonl",
        "summary.json",
    ]
    assert data.tokenize(inputs, tokenizer, "./") == first  # the same settings: nothing to do
    replaced = data.tokenize(inputs, tokenizer, "./", max_seq_len=64, overwrite=True)
    assert replaced["settings"]["max_seq_len"] == 64 and os.stat(".").st_ino == folder
    assert data.PairDataset(".").summary["settings"]["max_seq_len"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "rows.jsonl"]  # nothing left beside it


# --- length rules ------------------------------------------------------------------------------------------


def test_overflow_drop_truncate_raise(tokenizers_dir, tmp_path):
    directory = str(tokenizers_dir / "chatml")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    user = {"role": "user", "content": "Say something."}
    long_user = {"role": "user", "content": " ".join(WORDS[:60])}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "short"}],
            "rejected": [user, {"role": "assistant", "content": "tiny"}],
        },
        {
            "chosen": [user, {"role": "assistant", "content": " ".join(WORDS[:80])}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        },
        {
            "chosen": [long_user, {"role": "assistant", "content": "a"}],
            "rejected": [long_user, {"role": "assistant", "content": "b"}],
        },
    ]
    full = [{side: hf_ids(hf, row[side]) for side in ("chosen", "rejected")} for row in rows]
    prompt_lengths = [
        len(hf.apply_chat_template([r["chosen"][0]], add_generation_prompt=True)["input_ids"]) for r in rows
    ]
    max_seq_len = max(len(full[0]["chosen"]), len(full[0]["rejected"])) + 2
    assert prompt_lengths[1] < max_seq_len < len(full[1]["chosen"]) and prompt_lengths[2] >= max_seq_len
    inputs = write_jsonl(tmp_path / "rows.jsonl", rows)

    summary = data.tokenize(inputs, directory, str(tmp_path / "drop"), max_seq_len=max_seq_len)
    assert summary["rows_dropped"] == {"longer than max_seq_len": 2} and summary["rows_written"] == 1

    summary = data.tokenize(
        inputs, directory, str(tmp_path / "cut"), max_seq_len=max_seq_len, overflow="truncate"
    )
    assert summary["rows_dropped"] == {"prompt longer than max_seq_len": 1} and summary["rows_truncated"] == 1
    kept, cut = read_rows(tmp_path / "cut")
    assert kept["chosen_input_ids"] == full[0]["chosen"]
    assert cut["chosen_input_ids"] == full[1]["chosen"][:max_seq_len] and cut["chosen_length"] == max_seq_len
    cut_mask = cut["chosen_loss_mask"]
    assert cut["prompt_length"] == prompt_lengths[1] and not any(
        cut_mask[: prompt_lengths[1]]
    )  # whole prompt
    assert any(cut_mask)  # and at least one scored token
    assert cut["rejected_input_ids"] == full[1]["rejected"]  # the side that fits is untouched

    with pytest.raises(ValueError, match="over --max-seq-len"):
        data.tokenize(inputs, directory, str(tmp_path / "raise"), max_seq_len=max_seq_len, overflow="raise")
    assert not (tmp_path / "raise").exists()


def test_truncation_that_leaves_the_sides_identical_drops_the_pair(tokenizers_dir, tmp_path):
    """Two long replies that differ only past max_seq_len become the same tokens once truncated: such a
    pair teaches nothing, so it is dropped with its reason, not written."""
    user = {"role": "user", "content": "Say something."}
    reply = lambda *words: [user, {"role": "assistant", "content": " ".join(words)}]
    rows = [
        {"chosen": reply(*WORDS[:60], WORDS[61]), "rejected": reply(*WORDS[:60], WORDS[62])},
        {"chosen": reply(WORDS[1]), "rejected": reply(WORDS[2])},
    ]
    inputs = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = str(tmp_path / "cut")
    summary = data.tokenize(inputs, str(tokenizers_dir / "chatml"), out, max_seq_len=40, overflow="truncate")
    assert summary["rows_dropped"] == {"identical after truncation": 1} and summary["rows_written"] == 1


# --- output: idempotent, refused, atomic ---------------------------------------------------------------


def test_rerun_is_a_no_op_and_other_settings_are_refused(tokenizers_dir, tmp_path):
    tokenizer, output = str(tokenizers_dir / "zephyr"), tmp_path / "out"
    inputs = write_jsonl(tmp_path / "rows.jsonl", conversation_rows())
    first = data.tokenize(inputs, tokenizer, str(output))
    stamps = {f.name: f.stat().st_mtime_ns for f in output.iterdir()}
    assert data.tokenize(inputs, tokenizer, str(output)) == first
    assert {f.name: f.stat().st_mtime_ns for f in output.iterdir()} == stamps
    with pytest.raises(ValueError, match="other max_seq_len; pass --overwrite"):
        data.tokenize(inputs, tokenizer, str(output), max_seq_len=64)
    replaced = data.tokenize(inputs, tokenizer, str(output), max_seq_len=64, overwrite=True)
    assert replaced["settings"]["max_seq_len"] == 64 and replaced != first
    metadata = pq.read_schema(output / "part-00000.parquet").metadata
    assert json.loads(metadata[data.SETTINGS_KEY])["max_seq_len"] == 64
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files data.py did not write"):
        data.tokenize(inputs, tokenizer, str(tmp_path / "other"))


def test_interrupted_write_never_looks_complete(tokenizers_dir, tmp_path, monkeypatch):
    tokenizer, output = str(tokenizers_dir / "zephyr"), tmp_path / "out"
    inputs = write_jsonl(tmp_path / "rows.jsonl", conversation_rows() * 10)
    before = data.tokenize(inputs, tokenizer, str(output), max_seq_len=512)
    original, calls = pq.ParquetWriter.write_table, []

    def write_then_die(self, table, *args, **kwargs):
        # Mid-run (where a kill could strike) the target holds the old complete result or nothing, and
        # the directory being written does not look complete.
        if target == output:
            assert json.loads((output / "summary.json").read_text()) == before
        else:
            assert not target.exists()
        assert [data.is_tokenized(p) for p in tmp_path.glob(f".{target.name}.dpo-tmp")] == [False]
        calls.append(table.num_rows)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_then_die)
    for target in (output, tmp_path / "fresh"):  # row groups of 2 pairs: the 40 rows come in 3 chunks
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            data.tokenize(inputs, tokenizer, str(target), row_group_size=2, overwrite=True)
    assert json.loads((output / "summary.json").read_text()) == before
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith((".dpo-tmp", ".dpo-old"))] == []


# --- Hub-layout inputs and the CLI -------------------------------------------------------------------------


def ultrafeedback_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        prompt = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4 + i % 5)) + "?"
        chosen, rejected = " ".join(WORDS[i % 40 : i % 40 + 6]), " ".join(WORDS[i % 30 : i % 30 + 3])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"{i:064x}",
                "chosen": messages,
                "rejected": [messages[0], {"role": "assistant", "content": rejected}],
                "messages": messages,
                "score_chosen": 8.0,
                "score_rejected": 4.5,
            }
        )
    return rows


def write_hub_layout(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(ultrafeedback_rows(7)), root / "data" / "train_prefs-00000-of-00001.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(ultrafeedback_rows(3, 100)), root / "data" / "test_prefs-00000-of-00001.parquet"
    )
    return root


def test_local_directory_in_hub_layout(tokenizers_dir, tmp_path):
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers_dir / "llama31")
    root = write_hub_layout(tmp_path / "ultrafeedback")
    summary = data.tokenize(
        str(root), str(tokenizers_dir / "llama31"), str(tmp_path / "out"), split="test_prefs"
    )
    assert summary["format"] == "conversation" and summary["rows_read"] == summary["rows_written"] == 3
    expected = ultrafeedback_rows(3, 100)
    assert [r["chosen_input_ids"] for r in read_rows(tmp_path / "out")] == [
        hf_ids(hf, r["chosen"]) for r in expected
    ]
    with pytest.raises(ValueError, match="no Parquet files for split 'validation'"):
        data.tokenize(str(root), str(tokenizers_dir / "llama31"), str(tmp_path / "none"), split="validation")


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, data.__file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_reads_a_hub_dataset_from_the_cache_offline(tokenizers_dir, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--HuggingFaceH4--ultrafeedback_binarized"
    write_hub_layout(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    args = ["--input", "HuggingFaceH4/ultrafeedback_binarized", "--split", "train_prefs"]
    args += ["--tokenizer", str(tokenizers_dir / "llama31"), "--output", str(tmp_path / "out")]
    result = run_cli(*args, env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows_written"] == 7
    direct = data.tokenize(
        str(repo / "snapshots" / revision),
        str(tokenizers_dir / "llama31"),
        str(tmp_path / "direct"),
        split="train_prefs",
    )
    assert read_rows(tmp_path / "out") == read_rows(tmp_path / "direct") and direct["rows_written"] == 7


def test_cli_help_and_one_line_errors(tmp_path):
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ["--input", "--tokenizer", "--output", "--split", "--max-seq-len", "--overflow", "--format"]:
        assert flag in result.stdout
    for flag in ["--chat-template", "--system-field", "--scored-turns", "--overwrite", "--rows-per-shard"]:
        assert flag in result.stdout
    for flag in ["--row-group-size"]:
        assert flag in result.stdout
    result = run_cli(
        "--input",
        str(tmp_path / "missing.parquet"),
        "--tokenizer",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


# --- the loader --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_dir(tokenizers_dir, tmp_path_factory):
    """50 pairs of varied lengths in row groups of 4 pairs."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(50):
        user = {"role": "user", "content": f"item {i}: " + " ".join(WORDS[i : i + 1 + i % 7])}
        chosen = " ".join(WORDS[(3 * i) % 90 : (3 * i) % 90 + 1 + (i * 7) % 40])
        rows.append(
            {
                "chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": f"no {i}"}],
            }
        )
    inputs = write_jsonl(root / "rows.jsonl", rows)
    data.tokenize(
        inputs, str(tokenizers_dir / "chatml"), str(root / "out"), row_group_size=4, rows_per_shard=20
    )
    return root / "out"


def take(batches, n: int) -> list[dict]:
    return list(itertools.islice(batches, n))


def pair_keys(dataset_dir):
    """Each pair's source row, looked up from its chosen tokens (read straight from Parquet)."""
    rows = read_rows(dataset_dir)
    return rows, {tuple(r["chosen_input_ids"]): k for k, r in enumerate(rows)}


def batch_pairs(batch, keys) -> list[int]:
    return [keys[tuple(ids[0, : n[0]])] for ids, n in zip(batch["input_ids"], batch["lengths"], strict=True)]


REFERENCE = np.arange(100, dtype=np.float32).reshape(50, 2)  # a stand-in table of reference log-probs


# The widths a batch may take: multiples of 8 up to 64, then 8 to each octave (data.padded_width).
WIDTHS = sorted(
    {8 * k for k in range(1, 9)} | {2**p + j * 2 ** (p - 3) for p in range(6, 16) for j in range(1, 9)}
)


def check_batch(batch, rows, pairs, max_seq_len):
    """The batch against the Parquet rows: contents, padding, lengths, the width (the smallest of WIDTHS that
    holds the longest sequence, or max_seq_len) and, when the loader was given the reference table REFERENCE,
    each pair's row of it."""
    longest = max(max(rows[k]["chosen_length"], rows[k]["rejected_length"]) for k in pairs)
    width = min(max_seq_len, next(w for w in WIDTHS if w >= longest))
    assert width - longest < max(8, longest / 8)  # padding under 1/8 of the batch's longest sequence
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (len(pairs), 2, width)
    assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == bool
    if "ref_logps" in batch:
        assert batch["ref_logps"].tolist() == REFERENCE[pairs].tolist()
    for i, k in enumerate(pairs):
        for s, side in enumerate(("chosen", "rejected")):
            n = rows[k][f"{side}_length"]
            assert batch["lengths"][i, s] == n
            assert batch["input_ids"][i, s, :n].tolist() == rows[k][f"{side}_input_ids"]
            assert batch["loss_mask"][i, s, :n].tolist() == [bool(m) for m in rows[k][f"{side}_loss_mask"]]
            assert not batch["input_ids"][i, s, n:].any() and not batch["loss_mask"][i, s, n:].any()


def test_train_batches_are_deterministic_resumable_and_exact(dataset_dir):
    dataset = data.PairDataset(dataset_dir)
    rows, keys = pair_keys(dataset_dir)
    assert len(dataset) == 50 and len(list(dataset_dir.glob("part-*.parquet"))) == 3
    assert dataset.lengths.tolist() == [[r["chosen_length"], r["rejected_length"]] for r in rows]
    train, validation = data.split_indices(len(dataset), 0.2, seed=3)
    kwargs = dict(batch_size=8, seed=7, max_seq_len=126, reference=REFERENCE)
    first = take(data.train_batches(dataset, train, **kwargs), 12)
    again = take(data.train_batches(dataset, train, **kwargs), 12)
    resumed = take(data.train_batches(dataset, train, start_step=7, **kwargs), 5)
    for a, b in zip(first, again, strict=True):
        assert all(np.array_equal(a[key], b[key]) for key in a)
    for a, b in zip(first[7:], resumed, strict=True):  # crosses the epoch boundary at step 5
        assert all(np.array_equal(a[key], b[key]) for key in a)
    steps_per_epoch = len(train) // 8
    for epoch in range(2):
        seen = [
            k
            for b in first[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
            for k in batch_pairs(b, keys)
        ]
        assert len(set(seen)) == len(seen) == steps_per_epoch * 8 and set(seen) <= set(train.tolist())
    assert batch_pairs(first[0], keys) != batch_pairs(first[steps_per_epoch], keys)  # reshuffled per epoch
    other = next(data.train_batches(dataset, train, **{**kwargs, "seed": 8}))
    assert batch_pairs(other, keys) != batch_pairs(first[0], keys)
    for batch in first:
        check_batch(batch, rows, batch_pairs(batch, keys), max_seq_len=126)
        assert batch["weight"].tolist() == [1.0] * 8
    assert {b["input_ids"].shape[-1] for b in first} == {
        96,
        112,
        120,
        126,
    }  # rounded up to a width, or capped


def test_length_grouped_batches_cover_the_same_pairs_and_pad_less(dataset_dir):
    dataset = data.PairDataset(dataset_dir)
    rows, keys = pair_keys(dataset_dir)
    longest = {k: max(r["chosen_length"], r["rejected_length"]) for k, r in enumerate(rows)}
    train, _ = data.split_indices(len(dataset), 0.2, seed=3)
    kwargs = dict(batch_size=4, seed=5, max_seq_len=140)
    steps_per_epoch, window = len(train) // 4, 3  # 10 steps: runs of 3, 3, 3 and 1 batches
    plain = take(data.train_batches(dataset, train, **kwargs), 2 * steps_per_epoch)
    grouped = take(data.train_batches(dataset, train, group_by_length=True, window=window, **kwargs), 25)
    resumed = take(data.train_batches(dataset, train, start_step=13, group_by_length=True, window=window,
                                      **kwargs), 12)  # fmt: skip
    for a, b in zip(grouped[13:], resumed, strict=True):  # crosses the epoch boundary at step 20
        assert all(np.array_equal(a[key], b[key]) for key in a)
    ascending = []  # per run of batches: did they come shortest first?
    for epoch in range(2):
        epoch_batches = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        pairs = [batch_pairs(b, keys) for b in grouped[epoch_batches]]
        # The same pairs as the ungrouped epoch (the same shuffle, reordered), each once.
        assert sorted(sum(pairs, [])) == sorted(k for b in plain[epoch_batches] for k in batch_pairs(b, keys))
        for start in range(0, steps_per_epoch, window):  # within a run, batches hold disjoint length ranges
            ranges = [
                (min(longest[k] for k in b), max(longest[k] for k in b)) for b in pairs[start:][:window]
            ]
            assert all(low[1] <= high[0] for low, high in itertools.pairwise(sorted(ranges)))
            ascending.append(ranges == sorted(ranges))
    assert not all(ascending)  # batch order is shuffled again, not shortest first
    for batch in grouped:
        check_batch(batch, rows, batch_pairs(batch, keys), max_seq_len=140)
    efficiency = lambda batches: (
        sum(b["lengths"].sum() for b in batches) / sum(b["input_ids"].size for b in batches)
    )
    # chosen sides vary, rejected ones are short: less to gain than on real data
    assert efficiency(grouped[:steps_per_epoch]) > 1.05 * efficiency(plain[:steps_per_epoch])


def test_copies_of_a_pair_are_counted_marked_and_kept_on_one_side_of_the_split(tokenizers_dir, tmp_path):
    """A pair whose tokens repeat an earlier one's (also as other text that tokenizes the same, and across
    chunks and shards) is kept, counted in summary.json and marked with its first copy's row; a split
    given those marks keeps a pair's copies on one side."""
    user = lambda i: {"role": "user", "content": f"item {i}: {WORDS[i]}"}
    row = lambda i, c, r: {
        "chosen": [user(i), {"role": "assistant", "content": c}],
        "rejected": [user(i), {"role": "assistant", "content": r}],
    }
    rows = [row(i, WORDS[i + 20], WORDS[i + 40]) for i in range(12)]
    rows += [rows[0], rows[2], row(2, WORDS[22], WORDS[41]), row(0, WORDS[20] + "  ", WORDS[40]), rows[2]]
    inputs = write_jsonl(tmp_path / "rows.jsonl", rows)
    # chunks of 8 rows, shards of 5 pairs: copies in other chunks and other files
    tokenizer = str(tokenizers_dir / "llama31")  # its template trims content: row 15 is row 0 as tokens
    summary = data.tokenize(inputs, tokenizer, str(tmp_path / "out"), row_group_size=1, rows_per_shard=5)
    assert summary["rows_written"] == 17 and summary["duplicate_pairs"] == 4
    expected = list(range(12)) + [0, 2, 14, 0, 2]  # row 14 shares only chosen with row 2: not a copy
    assert [r["first_copy"] for r in read_rows(tmp_path / "out")] == expected
    dataset = data.PairDataset(tmp_path / "out")
    assert dataset.first_copy.tolist() == expected

    groups, straddled = dataset.first_copy, 0
    for seed in range(40):
        for fraction in (0.1, 0.3, 0.5):
            train, validation = data.split_indices(len(dataset), fraction, seed, groups)
            assert sorted([*train, *validation]) == list(range(17)) and len(validation) >= round(
                17 * fraction
            )
            assert not set(groups[train]) & set(groups[validation])
            plain = data.split_indices(len(dataset), fraction, seed)
            straddled += bool(set(groups[plain[0]]) & set(groups[plain[1]]))
    assert straddled  # what happened without the marks
    # Without repeats the marks change nothing: the split is the one made without them.
    for seed in range(5):
        marked, plain = data.split_indices(50, 0.2, seed, np.arange(50)), data.split_indices(50, 0.2, seed)
        assert all(np.array_equal(a, b) for a, b in zip(marked, plain, strict=True))
    with pytest.raises(ValueError, match="leaves no training pairs"):
        data.split_indices(4, 0.5, 0, [7, 7, 7, 7])  # one pair four times: no split keeps it on one side


def test_split_is_disjoint_deterministic_and_optional():
    train, validation = data.split_indices(1000, 0.1, seed=0)
    assert len(validation) == 100 and not set(train) & set(validation)
    assert sorted([*train, *validation]) == list(range(1000))
    assert np.array_equal(data.split_indices(1000, 0.1, seed=0)[1], validation)
    assert not np.array_equal(data.split_indices(1000, 0.1, seed=1)[1], validation)
    train, validation = data.split_indices(10, None, seed=0)
    assert train.tolist() == list(range(10)) and len(validation) == 0


@pytest.mark.parametrize("process_count, group_by_length", [(2, False), (4, False), (4, True)])
def test_process_slices_partition_the_global_batch(dataset_dir, process_count, group_by_length):
    dataset = data.PairDataset(dataset_dir)
    kwargs = dict(batch_size=8, seed=1, max_seq_len=256, group_by_length=group_by_length, window=2)
    whole = take(data.train_batches(dataset, range(50), **kwargs), 4)
    slices = [
        take(data.train_batches(dataset, range(50), row_slice=p, row_slices=process_count, **kwargs), 4)
        for p in range(process_count)
    ]
    for step, batch in enumerate(whole):
        for key in batch:
            assert np.array_equal(np.concatenate([s[step][key] for s in slices]), batch[key])


def test_eval_batches_cover_indices_in_order_with_a_weighted_tail(dataset_dir):
    dataset = data.PairDataset(dataset_dir)
    rows, keys = pair_keys(dataset_dir)
    _, validation = data.split_indices(len(dataset), 0.2, seed=3)
    batches = list(data.eval_batches(dataset, validation, batch_size=4, max_seq_len=140, reference=REFERENCE))
    assert len(batches) == 3  # 10 pairs: 4 + 4 + 2 real and 2 padding
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.tolist() == [1.0] * 10 + [0.0] * 2
    order = [k for b in batches for k in batch_pairs(b, keys)]
    assert order[:10] == validation.tolist()
    for batch in batches:
        check_batch(batch, rows, batch_pairs(batch, keys), max_seq_len=140)
    kwargs = dict(batch_size=4, row_slices=2, max_seq_len=140)
    halves = [list(data.eval_batches(dataset, validation, row_slice=p, **kwargs)) for p in (0, 1)]
    assert np.concatenate([halves[0][-1]["weight"], halves[1][-1]["weight"]]).tolist() == [1, 1, 0, 0]


def test_loader_refuses_pairs_longer_than_max_seq_len(dataset_dir):
    dataset = data.PairDataset(dataset_dir)
    with pytest.raises(ValueError, match="over max_seq_len 16"):
        data.train_batches(dataset, range(50), batch_size=8, seed=0, max_seq_len=16)
