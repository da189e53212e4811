"""Preference data: raw pairs -> tokenized Parquet (`python data.py ...`), and the batch loader dpo.py reads.

  python data.py --input HuggingFaceH4/ultrafeedback_binarized --split train_prefs \\
      --tokenizer meta-llama/Llama-3.1-8B-Instruct --output data/uf_train --max-seq-len 2048

Each conversation is rendered with the model's own chat template and tokenized exactly as transformers'
`apply_chat_template(messages, tokenize=True)` does. The loss mask scores each side's reply (content and
end-of-turn token), as TRL does, or with --scored-turns all every assistant turn, as Marin does; system,
user and header tokens are not scored. Unusable rows go to rejects.jsonl with
a reason, never stopping the run. Output: Parquet shards (one row per pair), summary.json, rejects.jsonl,
written atomically; a folder holding anything data.py did not write is never replaced. The loader reads
the shards a row group at a time, shuffles per epoch from the seed (optionally grouping pairs of like
length), resumes at any step and hands each process its slice of the global batch (slice row_slice of
row_slices equal ones, as sharding.row_slices gives them: processes that differ only along context or
tensor get the same), laid out in the smallest of the run's few planned shapes that holds it (plan_shapes,
from every batch's lengths, known before step 1): a pair's two sequences side by side, or, with prefix
sharing or packing, rows of several sequences with the views the model's attention needs (Layout describes
both).

Row formats (FORMATS, detected from the columns and the first rows): conversation, prompt_completion, plain,
transcript (Anthropic/hh-rlhf as published).
Chat templates get what transformers' apply_chat_template passes them: a row's `tools` column (function
schemas) as tools=, and --chat-template-kwargs (e.g. '{"enable_thinking": false}' for Qwen3) as extra
variables. Tokenizers: tokenizer.json files are used as they are (transformers does the same for Llama 3's),
except for the LlamaTokenizer class (Llama 2, Mistral and Zephyr tokenizers), whose pre-tokenizer
transformers rebuilds at load time; data.py rebuilds it the same way. Any of these can make training data;
model.py trains the Llama, Qwen2 / Qwen2.5, Qwen3, Mistral, Gemma 2 and Gemma 3 families.
Left out on purpose: multimodal content, assistant turns without text content (one that is only tool calls
is rejected as empty), streaming from the Hub (a split is downloaded).
"""

import functools
import hashlib
import io
import itertools
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal, NamedTuple

import jinja2
import jinja2.ext
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, pre_tokenizers

import sharding

FORMATS = {
    "conversation": "`chosen`/`rejected` message lists sharing the prompt turns (UltraFeedback binarized)",
    "prompt_completion": "`prompt` (string or messages), `chosen`/`rejected` (strings or assistant messages)",
    "plain": "`prompt`, `chosen`, `rejected` strings, no chat template (base models)",
    "transcript": "`chosen`/`rejected` strings, each a whole `Human: ... Assistant: ...` dialogue (hh-rlhf)",
}
TURN = re.compile(r"\n\n(Human|Assistant): ")  # a turn of an hh-rlhf transcript
ROLES = ("system", "user", "assistant", "tool")
SIDES = ("chosen", "rejected")
SETTINGS_KEY = b"dpo_jax.settings"  # Parquet metadata key of the settings (summary.json repeats them)
# Of the output format: 2 records max_token_id and the tokenizer, 3 shared_length, 4 scored_turns (whose
# default, the reply only, scores fewer tokens than 3 did in multi-turn rows) and first_copy.
VERSION = 4
SCHEMA = pa.schema(
    [
        ("source_index", pa.int64()),  # row number in the input, files concatenated in order
        ("prompt_length", pa.int32()),  # tokens before the response's first scored token
        # leading tokens both sides share, ids and mask: what prefix sharing runs once
        ("shared_length", pa.int32()),
        ("chosen_length", pa.int32()),
        ("rejected_length", pa.int32()),
        # the row of the first pair with the same tokens (its own row if none came before): copies share it
        ("first_copy", pa.int64()),
        ("chosen_input_ids", pa.list_(pa.int32())),
        ("chosen_loss_mask", pa.list_(pa.int8())),  # 1 = scored target: its log-prob given the tokens before
        ("rejected_input_ids", pa.list_(pa.int32())),
        ("rejected_loss_mask", pa.list_(pa.int8())),
    ]
)
_SPECIAL_TOKEN_NAMES = "bos_token eos_token unk_token sep_token pad_token cls_token mask_token".split()
# A tokenizer's files: what data.py fetches from the Hub, and what dpo.py copies into every export.
TOKENIZER_FILES = "tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja".split()
_SPLIT_PATTERNS = ("data/{split}-*.parquet", "data/{split}/*.parquet")  # Hub dataset repos' split layout
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name; anything else is a local path
_SUFFIXES = (".parquet", ".jsonl", ".json")  # the input files read
_SPLIT_STREAM, _SHUFFLE_STREAM = 0, 1  # independent random streams from one seed


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class RejectedRow(Exception):
    """A row that cannot become a pair; `reason` is the short category the summary counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class NoChatTemplate(ValueError):
    """The rows are chat messages and the tokenizer has no chat template (dpo.py words the remedy its way)."""


class SettingsChanged(ValueError):
    """The output holds an earlier output made from other inputs or settings (`changed` names them)."""

    def __init__(self, message: str, changed: str):
        super().__init__(f"{message}; pass --overwrite to replace it")
        self.changed = changed


class NoUsableRow(ValueError):
    """Every row was rejected (the message gives the first reasons)."""


class Pair(NamedTuple):
    index: int
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    prompt_length: int


def tyro_cli(function, **options):
    """tyro.cli(function, **options) with a mistake on the command line (a bad value, an unknown flag, a
    value the config refuses) raised as a one-line ValueError, where tyro prints a box of many lines (dpo.py
    parses its config with it too). What `function` itself prints goes where it always does."""
    import tyro  # only the command lines need it

    stderr, shown = sys.stderr, io.StringIO()

    @functools.wraps(function)
    def call(*args, **kwargs):  # the command line parsed: stderr is the real one again
        sys.stderr = stderr
        return function(*args, **kwargs)

    sys.stderr = shown
    try:
        return tyro.cli(call, **options)
    except SystemExit as e:
        if sys.stderr is not shown or e.code in (0, None):  # --help, or the function's own exit
            raise
        raise ValueError(_one_line(shown.getvalue())) from None
    finally:
        sys.stderr = stderr


def _one_line(box: str) -> str:
    """tyro's error box as one line: the message, and the flags that a "Missing" or "Perhaps you meant" list
    names; not the frame, the help texts or the pointer to --help."""
    sections = [[]]
    for line in re.sub(r"\x1b\[[0-9;]*m", "", box).splitlines():  # without colours
        line = line.strip()
        body = line[1:-1] if line.startswith("│") else line  # inside the frame, indents kept
        body = body.removeprefix(" ").rstrip()
        if line.startswith(("╭", "╰")) or body and set(body.strip()) <= {"─"}:  # frame, rule: a new section
            sections.append([])
        elif body:
            sections[-1].append(body)
    parts = []
    for lines in filter(None, sections):
        if lines[0].startswith(("Argument helptext", "For full helptext")):
            continue
        flags = [line.split()[0] for line in lines[1:] if line.lstrip().startswith("--")]
        parts.append(" ".join([line for line in lines if not line.startswith(" ")] + [", ".join(flags)]))
    # tyro words a value the config refuses "Error parsing config: <the config's message>".
    message = re.sub(r"^Error parsing \w+: ", "", " ".join("; ".join(parts).split()))
    return message or " ".join(box.split())


# --- chat templates, rendered the way transformers renders them --------------------------------------------


class _GenerationTags(jinja2.ext.Extension):
    """Parses transformers' `{% generation %}` markers and renders their body as is: masks come from
    prefix renders (_render_turns), so templates with and without markers work alike."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


# transformers' two additions to the sandbox, so that the same templates are refused. The sandbox hands
# templates `dict` itself, whose unbound methods it does not guard: `dict.update(messages[0], ...)` would
# rewrite the messages between the renders of one pair. And namespace() takes attribute names the
# sandbox would refuse to read (underscores). tests/test_data.py shows both.
class _TemplateDict:  # dict() and dict.fromkeys(), not the type
    __call__, fromkeys = staticmethod(dict), staticmethod(dict.fromkeys)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes."""

    def __init__(*args, **kwargs):
        _TemplateNamespace.check(dict(*args[1:], **kwargs))
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name, value):
        _TemplateNamespace.check([name])  # not self.check: Namespace answers attribute lookups from its items
        super().__setitem__(name, value)

    @staticmethod
    def check(names):
        if any(isinstance(name, str) and name.startswith("_") for name in names):
            raise jinja2.exceptions.SecurityError("namespace attributes may not start with an underscore")


def _compile_template(source: str) -> jinja2.Template:
    """Hub templates are untrusted code: a sandbox, with transformers' block settings, extensions, filters
    and globals, so the text is byte-identical to apply_chat_template's."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # no HTML escapes
        options = dict(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        return json.dumps(value, **options)

    extensions = [_GenerationTags, jinja2.ext.loopcontrols]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=_TemplateDict(), namespace=_TemplateNamespace)
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from None


def _snapshot(repo_id: str, repo_type: str, patterns: list[str]) -> Path:
    import huggingface_hub  # only Hub inputs need it

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns))
    except (OSError, ValueError) as e:  # every Hub failure (offline, not found, bad id) is one of these
        raise ValueError(f"cannot get {repo_id} from the Hub: {str(e).splitlines()[0]}") from None


class ChatTokenizer:
    """tokenizer.json, the chat template, and the special-token variables transformers passes to it."""

    def __init__(
        self, name_or_path: str, chat_template: str | None = None, template_kwargs: dict | None = None
    ):
        self.template_kwargs = template_kwargs or {}  # e.g. Qwen3's enable_thinking, as apply_chat_template's
        self.source, directory = str(name_or_path), Path(name_or_path)
        if not directory.is_dir():
            if not _HUB_ID.fullmatch(name_or_path):
                raise ValueError(f"tokenizer {name_or_path}: no such directory")
            directory = _snapshot(name_or_path, "model", TOKENIZER_FILES)
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise ValueError(f"tokenizer {name_or_path}: no tokenizer.json in {directory}")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise ValueError(f"{tokenizer_json}: not a readable tokenizer ({e})") from None
        config = _read_json(directory / "tokenizer_config.json")
        prepend = None
        if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):  # Llama 2, Mistral
            # transformers rebuilds this class around tokenizer.json's vocabulary: no normalizer, and a
            # Metaspace pre-tokenizer that writes "▁" for " " and puts one before the text ("first") or also
            # after every special token ("always", what config legacy: true asks for). Done here too, so that
            # "<s>[INST]" tokenizes as transformers has it.
            legacy, add_prefix_space = config.get("legacy", False), config.get("add_prefix_space")
            prepend = "never" if add_prefix_space is False else "always" if legacy else "first"
            self.tokenizer.normalizer = None
            self.tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=prepend, split=False)
        # bos_token, eos_token, ...: strings, or {"content": ...} dicts in older configs
        content = lambda value: value.get("content") if isinstance(value, dict) else value
        tokens = {name: content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
        self.special_tokens = {name: t for name, t in tokens.items() if isinstance(t, str)}
        eos = self.special_tokens.get("eos_token")
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

        # Like transformers: chat_template.jinja over tokenizer_config.json's entry, which may be a list of
        # named templates ("default", "tool_use"); --chat-template names one of those or a file.
        named = config.get("chat_template")
        named = {t["name"]: t["template"] for t in named} if isinstance(named, list) else named
        if chat_template is not None and isinstance(named, dict) and chat_template in named:
            source = named[chat_template]
        elif chat_template is not None:
            if not Path(chat_template).is_file():
                raise ValueError(f"--chat-template {chat_template}: no such file or named template")
            source = Path(chat_template).read_text()
        elif (directory / "chat_template.jinja").is_file():
            source = (directory / "chat_template.jinja").read_text()
        else:
            source = named.get("default") if isinstance(named, dict) else named
        self.template = _compile_template(source) if source else None
        self.fingerprint = {  # what the token ids depend on, for the no-op re-run check
            "tokenizer.json": hashlib.sha256(tokenizer_json.read_bytes()).hexdigest(),
            "chat_template": hashlib.sha256((source or "").encode()).hexdigest(),
            **self.special_tokens,
            **({"metaspace_prepend": prepend} if prepend else {}),
        }

    def render(self, messages: list[dict], generation: bool = False, tools: list | None = None) -> str:
        """The template's text, with the variables transformers' apply_chat_template passes (its keyword
        arguments after the special tokens, so they may override them)."""
        variables = dict(messages=messages, tools=tools, documents=None, add_generation_prompt=generation)
        try:
            return self.template.render(**variables | self.special_tokens | self.template_kwargs)
        except Exception as e:  # a template is arbitrary code: whatever it raises rejects this row only
            raise RejectedRow("template error", f"{type(e).__name__}: {e}") from None


# --- one row -> one pair -----------------------------------------------------------------------------------


def _absent(row: dict, field: str) -> RejectedRow:
    """A field with no value: not there at all, or null."""
    return RejectedRow("missing field", f"{field} is {'null' if field in row else 'missing'}")


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise _absent(row, field)
    if not isinstance(value, str):
        raise RejectedRow("wrong type", f"{field} is {type(value).__name__}, not a string")
    if not value.strip():
        raise RejectedRow("empty content", f"{field} is empty")
    return value


def _transcript(row: dict, field: str) -> list[dict]:
    """A side of an Anthropic/hh-rlhf row, "\\n\\nHuman: ...\\n\\nAssistant: ...", as its turns (user and
    assistant messages, their text as it stands), validated as any message list."""
    head, *parts = TURN.split(_text(row, field))
    if head or not parts:
        raise RejectedRow("malformed transcript", f"{field} does not start with a Human or Assistant turn")
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": text}
        for who, text in zip(parts[::2], parts[1::2], strict=True)
    ]
    return _messages({field: turns}, field)


def _messages(row: dict, field: str, role: str | None = None) -> list[dict]:
    """The validated message list in `field`; given a role, a plain string becomes one message of it."""
    value = row.get(field)
    if value is None:
        raise _absent(row, field)
    if isinstance(value, str) and role is not None:
        value = [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RejectedRow("wrong type", f"{field} is {type(value).__name__}, not a non-empty message list")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RejectedRow("wrong type", f"{field} has a message that is not a dict with a string role")
        if message["role"] not in ROLES:
            raise RejectedRow("unknown role", f"{field} has role {message['role']!r}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise RejectedRow("wrong type", f"{field} has {type(content).__name__} content")
        if not content or not content.strip():
            raise RejectedRow("empty content", f"{field} has an empty {message['role']} message")
    # as transformers does, keys holding None are dropped (templates test whether a key is defined)
    return [{key: item for key, item in message.items() if item is not None} for message in value]


def _tools(row: dict) -> list | None:
    """A row's `tools` column, the function schemas passed to the template as apply_chat_template's tools=: a
    list of JSON objects, or that list as JSON text (how Parquet files with varied schemas hold it)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise RejectedRow("wrong type", "tools is a string that is not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RejectedRow("wrong type", "tools is not a list of JSON objects (function schemas)")
    return tools or None


def _parse_row(row, fmt: str, system_field: str | None) -> tuple:
    """(prompt, chosen completion, rejected completion): message lists, or strings for `plain`."""
    if isinstance(row, RejectedRow):  # a line of a .jsonl file that did not decode
        raise row
    if not isinstance(row, dict):
        raise RejectedRow("wrong type", "the row is not a JSON object")
    if fmt == "plain":
        prompt, chosen, rejected = (_text(row, name) for name in ("prompt", "chosen", "rejected"))
    else:
        if fmt in ("conversation", "transcript"):
            side = _messages if fmt == "conversation" else _transcript
            chosen, rejected = side(row, "chosen"), side(row, "rejected")
            prompt = chosen[:-1]
        else:
            prompt = _messages(row, "prompt", "user")
            chosen, rejected = _messages(row, "chosen", "assistant"), _messages(row, "rejected", "assistant")
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if side[-1]["role"] != "assistant":
                raise RejectedRow("no assistant turn", f"{name} does not end with an assistant turn")
        if fmt in ("conversation", "transcript"):
            if rejected[:-1] != prompt:
                raise RejectedRow("prompt differs", "chosen and rejected do not share their prompt turns")
            _check_prompt_field(row.get("prompt"), prompt)
            chosen, rejected = chosen[-1:], rejected[-1:]
        system = row.get(system_field) if system_field else None
        if system is not None and not isinstance(system, str):
            raise RejectedRow("wrong type", f"{system_field} is {type(system).__name__}, not a string")
        if system and system.strip() and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": system}, *prompt]
    if chosen == rejected:
        raise RejectedRow("chosen equals rejected", "the two responses are identical")
    return prompt, chosen, rejected


def _check_prompt_field(field, turns: list[dict]) -> None:
    """A conversation row may also carry its prompt in a `prompt` field (UltraFeedback does): that prompt
    must be among the turns before the replies, or it would silently be left out of the tokens."""
    pick = lambda messages: [(m.get("role"), m.get("content")) for m in messages if isinstance(m, dict)]
    if isinstance(field, str):
        found = not field or any(field.strip() in m["content"] for m in turns)
    else:  # None or [] leave nothing to check
        found = field is None or isinstance(field, list) and pick(turns[: len(field)]) == pick(field)
    if not found:
        raise RejectedRow(
            "prompt not in conversation", "the prompt field is not among the turns before the replies"
        )


def _render_turns(
    chat: ChatTokenizer, messages: list[dict], first: int, tools=None
) -> tuple[str, list[tuple]]:
    """The conversation's text, and the (turn start, content end, turn end) characters of each assistant
    turn from message `first` on (scored_turns: the reply's, or all). A turn runs from the render of the
    messages before it with the generation prompt to the render including it, so templates without
    {% generation %} markers (Llama 3.1's) work. Its text may open with template text before the content
    (Llama 2's " " after [/INST]): the model writes that too."""
    render = functools.partial(chat.render, tools=tools)
    full, turns = render(messages), []
    for a, message in enumerate(messages):
        if a < first or message["role"] != "assistant":
            continue
        start = render(messages[:a], generation=True)
        end = full if a + 1 == len(messages) else render(messages[: a + 1])
        if not (end.startswith(start) and full.startswith(end)):
            raise RejectedRow("template not prefix-stable", f"the render up to turn {a} is not a prefix")
        content = message["content"]
        at = full.find(content, len(start), len(end))
        if at < 0:  # templates often trim the content
            content = content.strip()
            at = full.find(content, len(start), len(end))
        if at < 0:
            raise RejectedRow("template error", f"turn {a}'s content is not in its rendered turn")
        turns.append((len(start), at + len(content), len(end)))
    return full, turns


def _scored(encoding, turns, special_ids) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Token ids, loss mask and each turn's first scored token. Scored: every token overlapping the turn
    through its content, then through the first special token after it inside the turn (<|eot_id|>,
    <|im_end|>, </s>: the model learns to stop); what follows it (a newline, the next header) is not."""
    ids = encoding.ids
    mask, firsts = np.zeros(len(ids), np.int8), []
    for turn_start, content_end, turn_end in turns:
        chars = range(turn_start, content_end)
        first = next((t for c in chars if (t := encoding.char_to_token(c)) is not None), None)
        if first is None:
            raise RejectedRow("template error", "an assistant turn's content has no tokens")
        last, stop = encoding.char_to_token(content_end - 1), first + 1
        for t in range(first if last is None else last, len(ids)):  # a char may span several byte tokens
            token_start = encoding.token_to_chars(t)[0]
            if token_start < content_end:
                stop = t + 1
            elif token_start >= turn_end:
                break
            elif ids[t] in special_ids:
                stop = t + 1
                break
        mask[first:stop] = 1
        firsts.append(first)
    return np.array(ids, np.int32), mask, firsts


def _check_text(text: str, what: str) -> None:
    """Text the tokenizer can take. JSON can spell a lone UTF-16 surrogate ("\\ud800", common in scraped
    data), which is no Unicode character: such a row is rejected, not the whole chunk it came in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"{e.object[e.start : e.end]!r} at character {e.start}"
        raise RejectedRow("invalid text", f"{what} holds {where}, a lone UTF-16 surrogate") from None


def _tokenize_rows(chat: ChatTokenizer, fmt: str, rows: list[tuple[int, object]], settings: dict):
    """(index, row)s -> (pairs, rejects as (index, reason, detail)). All texts of the chunk go through one
    encode_batch call, which the tokenizers library spreads over its Rust threads."""
    # parsed: (index, the sides' texts, the prompt (plain) or (the sides' turn spans, prompt turns scored))
    parsed, rejects, pairs = [], [], []
    for index, row in rows:
        try:
            prompt, chosen, rejected = _parse_row(row, fmt, settings["system_field"])
            if fmt == "plain":
                for name, text in zip(("prompt", *SIDES), (prompt, chosen, rejected), strict=True):
                    _check_text(text, name)
                parsed.append((index, (chosen, rejected), prompt))
            else:
                first = 0 if settings["scored_turns"] == "all" else len(prompt)  # the first message scored
                tools = _tools(row)
                rendered = [_render_turns(chat, prompt + side, first, tools) for side in (chosen, rejected)]
                texts, spans = zip(*rendered, strict=True)  # both sides' texts, both sides' turns
                for name, text in zip(SIDES, texts, strict=True):
                    _check_text(text, f"the {name} conversation")
                parsed.append((index, texts, (spans, sum(m["role"] == "assistant" for m in prompt[first:]))))
        except RejectedRow as e:
            rejects.append((index, e.reason, e.detail))
    encode = chat.tokenizer.encode_batch
    encodings = encode([text for _, texts, _ in parsed for text in texts], add_special_tokens=False)
    if fmt == "plain":  # the prompt gets the tokenizer's own special tokens (BOS), responses end with EOS
        prompts = encode([prompt for _, _, prompt in parsed], add_special_tokens=True)
        eos = [] if chat.eos_id is None else [chat.eos_id]
    for k, (index, _, extra) in enumerate(parsed):
        try:
            if fmt == "plain":
                prompt_ids, sides = prompts[k].ids, []
                for response in encodings[2 * k : 2 * k + 2]:
                    ids = np.array(prompt_ids + response.ids + eos, np.int32)
                    sides += [ids, (np.arange(len(ids)) >= len(prompt_ids)).astype(np.int8)]
                pair = Pair(index, *sides, len(prompt_ids))
            else:
                spans, prompt_turns = extra
                chosen, rejected = (_scored(encodings[2 * k + s], spans[s], chat.special_ids) for s in (0, 1))
                prompt_length = max(chosen[2][prompt_turns], rejected[2][prompt_turns])
                pair = Pair(index, *chosen[:2], *rejected[:2], prompt_length)
            # Templates trim whitespace, so replies that differ as text ("Paris." and "Paris. ") can become
            # the same tokens: such a pair teaches nothing.
            if _identical(pair):
                raise RejectedRow("identical after tokenization", "chosen and rejected have the same tokens")
            pairs.append(pair)
        except RejectedRow as e:
            rejects.append((index, e.reason, e.detail))
    return pairs, rejects


def _fit(pair: Pair, max_seq_len: int, overflow: str) -> tuple[Pair, bool]:
    """The pair within max_seq_len and whether it was cut; RejectedRow when it is dropped."""
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if longest <= max_seq_len:
        return pair, False
    if overflow == "raise":
        raise ValueError(f"row {pair.index} is {longest} tokens, over --max-seq-len {max_seq_len}")
    if overflow == "drop":
        raise RejectedRow("longer than max_seq_len", f"{longest} tokens")
    if pair.prompt_length >= max_seq_len:  # truncate keeps the whole prompt and at least one scored token
        raise RejectedRow("prompt longer than max_seq_len", f"the prompt is {pair.prompt_length} tokens")
    cut = pair._replace(**{name: getattr(pair, name)[:max_seq_len] for name in Pair._fields[1:5]})
    if _identical(cut):  # replies that differ only past max_seq_len
        raise RejectedRow("identical after truncation", f"the sides differ only after token {max_seq_len}")
    return cut, True


# --- inputs and output files -------------------------------------------------------------------------------


def _input_files(inputs: str | Sequence[str], split: str) -> list[Path]:
    patterns, files = [pattern.format(split=split) for pattern in _SPLIT_PATTERNS], []
    for item in [inputs] if isinstance(inputs, str) else inputs:
        path = Path(item)
        if not path.exists() and _HUB_ID.fullmatch(item) and path.suffix not in _SUFFIXES:
            path = _snapshot(item, "dataset", patterns)  # downloads only this split's Parquet files
        if path.is_dir():
            found = sorted(f for pattern in patterns for f in path.glob(pattern))
            if not found:
                raise ValueError(f"{item}: no Parquet files for split {split!r} ({', '.join(patterns)})")
            files += found
        elif path.is_file() and path.suffix in _SUFFIXES:
            files.append(path)
        elif path.suffix in _SUFFIXES:
            raise ValueError(f"{item}: no such file")
        else:
            raise ValueError(f"{item}: not a .parquet/.jsonl/.json file, a directory or a Hub dataset id")
    return files


def _read_chunks(files: list[Path], fields: list[str], chunk_rows: int) -> Iterator[list]:
    """Rows in chunks, reading only the fields we use (UltraFeedback also repeats `messages`). A line of a
    .jsonl file that does not decode becomes a RejectedRow naming its file and line; the rest is kept."""
    for path in files:
        if path.suffix == ".parquet":
            parquet = _parquet(path)
            columns = [field for field in fields if field in parquet.schema_arrow.names]
            binary = [name for name in columns if _holds_binary(parquet.schema_arrow.field(name).type)]
            for batch in parquet.iter_batches(chunk_rows, columns=columns):
                yield [_as_text(row, binary) for row in batch.to_pylist()] if binary else batch.to_pylist()
            continue
        with path.open("rb") as f:
            if path.suffix == ".json" and f.read(1024).lstrip().startswith(b"["):
                try:
                    rows = iter(json.loads(path.read_bytes()))
                except ValueError as e:  # a truncated array, a byte that is not UTF-8
                    raise ValueError(f"{path}: not a valid JSON array ({e})") from None
            else:
                f.seek(0)
                rows = (_json_line(path, n, line) for n, line in enumerate(f, 1) if line.strip())
            while chunk := list(itertools.islice(rows, chunk_rows)):
                yield chunk


def _holds_binary(kind: pa.DataType) -> bool:
    """Whether a Parquet column's type is, or nests, binary: some writers type text so (pandas' object
    columns of bytes, Spark's BINARY)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return True
    return any(_holds_binary(kind.field(i).type) for i in range(kind.num_fields))


def _as_text(row: dict, binary: list[str]):
    """The row with the bytes of its `binary` columns read as UTF-8 text, as a string column would hold it;
    bytes that are not UTF-8 reject the row, naming the column."""
    decoded = lambda value: (
        value.decode("utf-8")
        if isinstance(value, bytes)
        else [decoded(v) for v in value]
        if isinstance(value, list)
        else {k: decoded(v) for k, v in value.items()}
        if isinstance(value, dict)
        else value
    )
    for name in binary:
        try:
            row[name] = decoded(row[name])
        except UnicodeDecodeError as e:
            where = f"byte {e.object[e.start : e.end]!r} at {e.start}"
            return RejectedRow("invalid text", f"{name} is typed binary and its {where} is not UTF-8")
    return row


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's errors name no file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None


def _json_line(path: Path, number: int, line: bytes):
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are
        return RejectedRow("invalid JSON", f"{path.name} line {number}: {e}")


def _row_format(columns: list[str], row) -> str | None:
    chosen = row.get("chosen") if isinstance(row, dict) else None
    if "chosen" in columns and "rejected" in columns:
        if isinstance(chosen, list):
            has_prompt_turns = any(isinstance(m, dict) and m.get("role") != "assistant" for m in chosen)
            return "prompt_completion" if "prompt" in columns and not has_prompt_turns else "conversation"
        if isinstance(chosen, str) and "prompt" not in columns and TURN.search(chosen):
            return "transcript"
        if isinstance(chosen, str) and "prompt" in columns and isinstance(row.get("prompt"), str | list):
            return "plain" if isinstance(row["prompt"], str) else "prompt_completion"
    return None


def _open_input(files: list[Path], fmt: str, system_field: str | None, chunk_rows: int):
    """(chunks of rows, the input's columns, its format): `fmt`, or for auto the format most of the first
    rows have (one bad row does not decide for the file)."""
    fields = ["prompt", "chosen", "rejected", "tools"] + ([system_field] if system_field else [])
    chunks = _read_chunks(files, fields, chunk_rows)
    first = next(chunks, [])
    if not first:
        raise ValueError(f"{', '.join(map(str, files))} has no rows")
    if files[0].suffix == ".parquet":
        columns = pq.read_schema(files[0]).names
    else:
        columns = list(dict.fromkeys(key for row in first if isinstance(row, dict) for key in row))
    if system_field and system_field not in columns:
        raise ValueError(f"--system-field {system_field} names no column; columns: {', '.join(columns)}")
    if not any(isinstance(row, dict) for row in first):  # not one object among the first rows
        problem = next((row.detail for row in first if isinstance(row, RejectedRow)), "not JSON objects")
        raise ValueError(f"the first {len(first)} rows of {files[0]} are not usable ({problem})")
    if fmt == "auto":
        votes = Counter(guess for row in first if (guess := _row_format(columns, row)))
        if not votes:
            raise ValueError(_format_help(columns, _no_format(columns, first)))
        fmt = votes.most_common(1)[0][0]
    return itertools.chain([first], chunks), columns, fmt


def _no_format(columns: list[str], rows: list) -> str:
    """Why no row matched a format: a side's column is not there, or the columns hold only nulls."""
    if missing := [side for side in SIDES if side not in columns]:
        return f"the columns match no format: there is no {' or '.join(missing)} column"
    null = [f for f in ("prompt", *SIDES) if f in columns and all(_no_value(row, f) for row in rows)]
    if null:
        null = f"{' and '.join(null)} {'is' if len(null) == 1 else 'are'}"
        return f"the rows match no format: {null} null in all of the first {len(rows)} rows"
    # The columns are the expected ones, so their values' types are the problem: named.
    first = lambda f: next(row[f] for row in rows if not _no_value(row, f))
    kinds = [f"{f} holds {type(first(f)).__name__}" for f in ("prompt", *SIDES) if f in columns]
    return f"the columns match no format ({', '.join(kinds)})"


def _no_value(row, field: str) -> bool:
    return not isinstance(row, dict) or row.get(field) is None


def _format_help(columns: list[str], problem: str) -> str:
    accepted = "; ".join(f"{name}: {description}" for name, description in FORMATS.items())
    return f"{problem}. Accepted formats: {accepted}. Columns found: {', '.join(columns) or 'none'}"


class _ShardWriter:
    """part-NNNNN.parquet files of rows_per_shard pairs, in row groups of row_group_size pairs: small, so
    the loader's random access decodes little more than the pairs it needs."""

    def __init__(self, directory: Path, settings: dict):
        self.directory, self.settings = directory, settings
        self.schema = SCHEMA.with_metadata({SETTINGS_KEY: json.dumps(settings)})
        self.names, self.rows, self._writer = [], 0, None  # rows: pairs written so far, in all shards

    def write(self, pairs: list[Pair], first_copies: list[int]):
        def lists(arrays):  # one Arrow list column from numpy arrays, no Python ints in between
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays)))

        columns = Pair(*zip(*pairs, strict=True))
        lengths = ([len(ids) for ids in side] for side in (columns.chosen_ids, columns.rejected_ids))
        shared = [_shared_length(pair) for pair in pairs]
        scalars = [columns.index, columns.prompt_length, shared, *lengths, first_copies]
        # the first columns of SCHEMA, then the four token lists
        arrays = [pa.array(values, kind) for values, kind in zip(scalars, SCHEMA.types, strict=False)]
        table = pa.Table.from_arrays([*arrays, *map(lists, columns[1:5])], schema=self.schema)
        per_shard = self.settings["rows_per_shard"]
        while table.num_rows:
            room = per_shard - self.rows % per_shard
            if room == per_shard:  # the shard is full, or there is none yet: start the next
                self.close()
                path = self.directory / f"part-{len(self.names):05d}.parquet"
                self.names.append(path.name)
                self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self._writer.write_table(table.slice(0, room), row_group_size=self.settings["row_group_size"])
            self.rows += min(room, table.num_rows)
            table = table.slice(room)

    def close(self):
        if self._writer is not None:
            self._writer.close()  # closing twice does nothing


def _identical(pair: Pair) -> bool:
    """Whether both sides are the same tokens (and loss mask)."""
    return len(pair.chosen_ids) == len(pair.rejected_ids) == _shared_length(pair)


def _tokens_key(pair: Pair) -> bytes:
    """A digest of the pair's tokens and masks, equal for copies."""
    parts = (np.int64(len(a)).tobytes() + np.ascontiguousarray(a).tobytes() for a in pair[1:5])
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def _shared_length(pair: Pair) -> int:
    """How many leading tokens the two sides share, in ids and in loss mask."""
    n = min(len(pair.chosen_ids), len(pair.rejected_ids))
    same = (pair.chosen_ids[:n] == pair.rejected_ids[:n]) & (pair.chosen_mask[:n] == pair.rejected_mask[:n])
    return int(n if same.all() else same.argmin())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# What data.py writes into its output folder, and dpo.py's cache of reference log-probs in reference/.
_OUTPUT_NAMES = re.compile(r"part-\d{5}\.parquet|summary\.json|rejects\.jsonl")
_REFERENCE_NAMES = re.compile(r"[0-9a-f]{16}(\.npy|\.partial\.npz)")


def is_tokenized(path: str | Path) -> bool:
    """Whether `path` is a data.py output (summary.json appears last, atomically; PairDataset checks that
    every shard it lists is there)."""
    return (Path(path) / "summary.json").is_file()


def _check_output(
    output: Path, files: list[Path], settings: dict, saved: dict | None, overwrite: bool
) -> None:
    """data.py replaces only what it wrote itself: a new or empty folder, or an earlier data.py output (made
    with the `saved` settings) holding nothing else; never a folder that holds its input or others' files."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")
    inputs = [f.resolve() for f in files]
    if output.with_name(f"{output.name}.rejects.jsonl").resolve() in inputs:
        raise ValueError(f"--output {output}: the input is where this output's rejected rows would go")
    if not output.exists() or not any(output.iterdir()):
        return
    inside = [f for f in inputs if output.resolve() in f.parents]
    if inside:
        raise ValueError(f"--output {output} holds the input {inside[0]}: choose another folder")

    def ours(p: Path) -> bool:
        if p.name == "reference" and p.is_dir():
            return all(_REFERENCE_NAMES.fullmatch(q.name) for q in p.iterdir())
        return bool(_OUTPUT_NAMES.fullmatch(p.name))

    others = sorted(p.name for p in output.iterdir() if not ours(p))
    if others or not isinstance(saved, dict):
        shown = ", ".join((others or sorted(p.name for p in output.iterdir()))[:3])
        raise ValueError(
            f"--output {output} holds files data.py did not write ({shown}): choose a new folder"
        )
    if not overwrite:
        changed = ", ".join(key for key in settings if saved.get(key) != settings[key])
        raise SettingsChanged(f"{output} was tokenized with other {changed}", changed)


def tokenize(
    input: str | list[str],
    tokenizer: str,
    output: str,
    *,
    split: str = "train",
    max_seq_len: int = 2048,
    overflow: Literal["drop", "truncate", "raise"] = "drop",
    format: Literal["auto", "conversation", "prompt_completion", "plain", "transcript"] = "auto",
    chat_template: str | None = None,
    chat_template_kwargs: str | None = None,
    system_field: str | None = None,
    scored_turns: Literal["reply", "all"] = "reply",
    overwrite: bool = False,
    rows_per_shard: int = 100_000,
    row_group_size: int = 128,
) -> dict:
    """Tokenize preference pairs into Parquet shards with the model's chat template and loss masks.

    Args:
        input: Hub dataset id (only --split's Parquet files are downloaded), a local directory laid out
            like a Hub dataset repo (data/<split>-*.parquet), or .parquet/.jsonl/.json files.
        tokenizer: Local directory or Hub id holding tokenizer.json and tokenizer_config.json.
        output: Output folder: part-*.parquet, summary.json, rejects.jsonl. It must be new, empty or an
            earlier data.py output; a folder holding other files (the input among them) is refused.
        split: Split to read from a Hub id or Hub-layout directory (e.g. train_prefs, test_prefs).
        max_seq_len: Longest sequence kept, in tokens, for each of chosen and rejected.
        overflow: For a pair with a side over max_seq_len: drop it; truncate the responses from their end
            (keeping the whole prompt and at least one scored token, else drop); or raise.
        format: Row format (FORMATS), auto-detected by default: conversation (chosen/rejected message lists),
            prompt_completion (prompt plus completions; strings become user/assistant turns), plain (no chat
            template), transcript (Anthropic/hh-rlhf's whole dialogues, the shared turns the prompt).
        chat_template: A Jinja file, or the name of one of the tokenizer's named templates, to use instead
            of the tokenizer's own chat template.
        chat_template_kwargs: A JSON object of extra template variables, as transformers' and TRL's
            chat_template_kwargs, e.g. '{"enable_thinking": false}' for Qwen3. A `tools` column of the rows
            (function schemas) goes to the template as apply_chat_template's tools=.
        system_field: Name of a field holding each row's system prompt, added as a system turn when the
            conversation has none.
        scored_turns: Which assistant turns the loss mask scores. reply: each side's reply only, the
            turns after the prompt the two sides share (TRL; DPO's y given the prompt x); all: every
            assistant turn, the prompt's earlier ones too, the same on both sides (Marin).
        overwrite: Replace an earlier data.py output made with other settings or inputs.
        rows_per_shard: Pairs per Parquet file.
        row_group_size: Pairs per Parquet row group, the loader's unit of reading.
    """
    started = time.perf_counter()
    options = dict(split=split, max_seq_len=max_seq_len, overflow=overflow, format=format)
    options |= dict(system_field=system_field, scored_turns=scored_turns)
    # Only when given: older outputs stay valid.
    if template_kwargs := parse_template_kwargs(chat_template_kwargs):
        options["chat_template_kwargs"] = template_kwargs
    options |= dict(rows_per_shard=rows_per_shard, row_group_size=row_group_size)
    for name in ("max_seq_len", "rows_per_shard", "row_group_size"):
        if options[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")
    files, output = _input_files(input, split), Path(output)
    if output.name in ("", ".."):  # ".", "./", "..": the folder's own name is needed for its siblings
        output = output.resolve()
    chat = ChatTokenizer(tokenizer, chat_template, template_kwargs)
    inputs = [{"file": f.name, "sha256": _sha256(f)} for f in files]
    settings = {"version": VERSION, "inputs": inputs, "tokenizer": chat.fingerprint, **options}
    previous = _read_json(output / "summary.json")  # {} if there is none
    if previous.get("settings") == settings:
        return previous  # the same inputs and settings: nothing to do
    _check_output(output, files, settings, previous.get("settings"), overwrite)

    chunks, columns, format = _open_input(files, format, system_field, 8 * row_group_size)
    summary = _write_output(output, chunks, columns, chat, format, settings, started)
    return summary | {"settings": settings}


def _write_output(output: Path, chunks, columns, chat, format, settings, started) -> dict:
    """The pairs of every chunk and summary.json, written into `output` all at once: a killed run never
    leaves an output that looks complete. When no row is usable, the reasons stay beside it."""
    if format != "plain" and chat.template is None:
        raise NoChatTemplate(
            f"{chat.source} has no chat template: pass --chat-template FILE or --format plain"
        )
    rejects = output.with_name(f"{output.name}.rejects.jsonl")
    # The folder the user is in is filled in place from a sibling: renamed over whole, as any other output
    # is, it would leave their shell in a deleted folder.
    here = output.resolve() == Path.cwd().resolve()
    with sharding.atomic(output.with_name(f".{output.name}.dpo-new") if here else output) as tmp:
        tmp.mkdir(parents=True)
        try:
            summary = _write_pairs(tmp, chunks, chat, format, settings)
        except NoUsableRow as e:  # keep the reasons where the user can read them
            (tmp / "rejects.jsonl").replace(rejects)
            raise NoUsableRow(_format_help(columns, f"{e}; every reason is in {rejects}")) from None
        seconds = time.perf_counter() - started
        summary |= {"seconds": round(seconds, 2), "rows_per_second": round(summary["rows_read"] / seconds, 1)}
        summary |= {"tokenizer": {"source": chat.source, "vocab_size": chat.tokenizer.get_vocab_size()}}
        (tmp / "summary.json").write_text(json.dumps(summary | {"settings": settings}, indent=2) + "\n")
    if here:
        _fill_in_place(output, output.with_name(f".{output.name}.dpo-new"))
    print(
        f"\rtokenize: {summary['rows_read']:,} rows read as {format}, {summary['rows_written']:,} pairs "
        f"written, {summary['rows_per_second']:,.0f} rows/s -> {output}",
        file=sys.stderr,
    )
    return summary


def _fill_in_place(output: Path, complete: Path) -> None:
    """Replace the files of `output` (all data.py's own: _check_output) with those of the `complete` folder
    beside it, summary.json out first and in last: no moment leaves an output that looks complete but is
    not (PairDataset starts from summary.json)."""
    (output / "summary.json").unlink(missing_ok=True)
    for old in output.iterdir():
        sharding.remove(old)
    for new in sorted(complete.iterdir(), key=lambda path: path.name == "summary.json"):
        shutil.move(new, output / new.name)  # a rename, unless the folder is a mount point of its own
    complete.rmdir()


def parse_template_kwargs(text: str | None) -> dict:
    """--chat-template-kwargs: a JSON object, refused in one line when it is not one."""
    try:
        kwargs = json.loads(text) if text else {}
    except ValueError as e:
        raise ValueError(f"chat_template_kwargs {text!r} is not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"chat_template_kwargs {text!r} is not a JSON object such as '{{\"enable_thinking\": false}}'"
        )
    # what data.py itself passes the template: overridden, the loss masks would cover the wrong tokens
    if taken := sorted(kwargs.keys() & {"messages", "tools", "documents", "add_generation_prompt"}):
        raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)}: data.py passes it itself")
    return kwargs


def _write_pairs(directory: Path, chunks, chat: ChatTokenizer, fmt: str, settings: dict) -> dict:
    """Tokenize chunk by chunk into shards and rejects.jsonl; return the counts for the summary."""
    started, rows_read, truncated, scored, tokens, max_id = time.perf_counter(), 0, 0, 0, 0, -1
    dropped, lengths, shards, first = Counter(), [], _ShardWriter(directory, settings), []
    row_of = {}  # each distinct pair's first row (its tokens' digest): copies are counted and marked
    with (directory / "rejects.jsonl").open("w") as rejects_file:
        for chunk in chunks:
            rows = list(enumerate(chunk, rows_read))
            pairs, rejects = _tokenize_rows(chat, fmt, rows, settings)
            rows_read += len(chunk)
            sides = [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
            lengths.append(np.array(sides, np.int32).reshape(-1, 2))
            kept, copies = [], []
            for pair in pairs:
                try:
                    pair, cut = _fit(pair, settings["max_seq_len"], settings["overflow"])
                except RejectedRow as e:
                    rejects.append((pair.index, e.reason, e.detail))
                    continue
                copies.append(row_of.setdefault(_tokens_key(pair), shards.rows + len(kept)))
                kept.append(pair)
                truncated += cut
                scored += int(pair.chosen_mask.sum() + pair.rejected_mask.sum())
                tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
                max_id = max(max_id, int(pair.chosen_ids.max()), int(pair.rejected_ids.max()))
            for index, reason, detail in sorted(rejects):
                rejects_file.write(json.dumps({"index": index, "reason": reason, "detail": detail}) + "\n")
                dropped[reason] += 1
                if len(first) < 3:
                    first.append(f"row {index}: {reason} ({detail})")
            if kept:
                shards.write(kept, copies)
            if sys.stderr.isatty():  # a progress line, without a dependency
                rate = rows_read / (time.perf_counter() - started)
                print(f"\rtokenize: {rows_read:,} rows, {rate:,.0f} rows/s", end="", file=sys.stderr)
    shards.close()
    if not shards.rows:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
        raise NoUsableRow(f"no usable row in {rows_read} rows read as {fmt} ({reasons}): {'; '.join(first)}")
    lengths = np.concatenate(lengths)
    percentiles = lambda x: {f"p{q}": int(np.percentile(x, q)) for q in (50, 90, 99)} | {"max": int(x.max())}
    return {
        "format": fmt,
        "rows_read": rows_read,
        "rows_written": shards.rows,
        "rows_truncated": truncated,
        "rows_dropped": dict(dropped.most_common()),  # per reason: bad rows and the length rule alike
        # pairs whose tokens repeat an earlier pair's: kept (first_copy marks them), one side of a split
        "duplicate_pairs": shards.rows - len(row_of),
        # of every pair that tokenized, before --max-seq-len (what a longer limit would keep)
        "token_length_percentiles": {side: percentiles(lengths[:, k]) for k, side in enumerate(SIDES)},
        "scored_token_share": round(scored / tokens, 4),
        "max_token_id": max_id,  # dpo.py refuses data whose ids the model's vocabulary does not have
        "shards": shards.names,
    }


# --- the loader --------------------------------------------------------------------------------------------


class PairDataset:
    """Lazy reader over data.py's shards. Only the lengths are read up front (`lengths`, [n, 2] int32:
    chosen, rejected; `shared`, [n], the tokens both share; `first_copy`, [n], the row of each pair's first
    copy); token lists are decoded a row group at a time,
    when asked for."""

    _LISTS = ["chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"]

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_tokenized(self.path):
            raise ValueError(f"{path} is not a data.py output directory; make one with python data.py")
        self.summary = _read_json(self.path / "summary.json")
        if self.summary.get("settings", {}).get("version") != VERSION:
            raise ValueError(f"{path} was made by an older data.py: tokenize it again")
        shards = sorted(self.path.glob("part-*.parquet"))
        missing = ", ".join(sorted(set(self.summary.get("shards", [])) - {f.name for f in shards}))
        if missing:
            raise ValueError(f"{path} lacks {missing} (summary.json lists them): tokenize it again")
        files = [_parquet(f) for f in shards]
        self._groups = [(f, g) for f in files for g in range(f.num_row_groups)]
        sizes = [f.metadata.row_group(g).num_rows for f, g in self._groups]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        columns = ["chosen_length", "rejected_length", "shared_length", "first_copy"]
        table = pa.concat_tables([f.read(columns=columns) for f in files])
        self.lengths = np.stack([table[name].to_numpy() for name in columns[:2]], axis=1)
        self.shared, self.first_copy = table["shared_length"].to_numpy(), table["first_copy"].to_numpy()
        self._cache = {}  # the last few decoded row groups: sequential reads hit it

    def __len__(self) -> int:
        return len(self.lengths)

    def _row_group(self, g: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if g not in self._cache:
            if len(self._cache) >= 8:
                del self._cache[next(iter(self._cache))]
            file, group = self._groups[g]
            table = file.read_row_group(group, columns=self._LISTS)
            lists = [table[name].combine_chunks() for name in self._LISTS]
            self._cache[g] = [(array.offsets.to_numpy(), array.values.to_numpy()) for array in lists]
        return self._cache[g]

    def read(self, indices: Sequence[int]) -> list[tuple[tuple[np.ndarray, np.ndarray], ...]]:
        """((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)) per index; each row group read once."""
        indices = np.asarray(indices, np.int64)
        groups, out = np.searchsorted(self._starts, indices, side="right") - 1, [None] * len(indices)
        for k in np.argsort(groups, kind="stable"):
            row = indices[k] - self._starts[groups[k]]
            lists = [values[start[row] : start[row + 1]] for start, values in self._row_group(groups[k])]
            out[k] = ((lists[0], lists[1]), (lists[2], lists[3]))
        return out


def split_indices(
    n: int, validation_fraction: float | None, seed: int, groups: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) pair indices, disjoint, picked from the seed; None or 0: no validation. Pairs of
    one of `groups` ([n], e.g. PairDataset.first_copy: a pair's copies) go to the same side, so that none
    is evaluated after being trained on; without repeats the split is the same as without groups."""
    if not validation_fraction:
        return np.arange(n), np.arange(0)
    n_validation = max(1, round(n * validation_fraction))
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    if groups is not None and 0 < n_validation < n:
        # Each pair takes its group's first place in the shuffled order; the cut moves to a group's end.
        _, first, inverse = np.unique(np.asarray(groups)[order], return_index=True, return_inverse=True)
        place = first[inverse]
        order, place = order[np.argsort(place, kind="stable")], np.sort(place)
        n_validation = int(np.searchsorted(place, place[n_validation - 1], side="right"))
    if not 0 < validation_fraction < 1 or n_validation >= n:
        raise ValueError(f"validation_split_fraction {validation_fraction} leaves no training pairs of {n}")
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


# A token's side in rows of several sequences (the batches' `side`, Layout): run once and counting for both
# sides, or one side's own.
SHARED, CHOSEN, REJECTED = 0, 1, 2


class Layout(NamedTuple):
    """How the loader lays pairs out, and the one description of the batches it yields (numpy, this process's
    rows; dpo.rows_of reads them). prefix_sharing: one sequence a pair, its shared prefix once; packing:
    several pairs to a row. Rows per step come in multiples of row_multiple (dpo.py: the batch axes' devices
    times the microbatches) and of row_slices (sharding.row_slices: how many slices the processes feed);
    row and view widths in multiples of width_multiple (the context axis's devices, each of which holds a
    row's share of tokens).

    One pair a row (_padded: neither prefix_sharing nor packing), b pairs of width T:
      input_ids     [b, 2, T] int32   chosen (index 0) and rejected (1) side by side, right-padded with 0
      loss_mask     [b, 2, T] bool    True: the token is scored (its log-prob given those before it counts)
      lengths       [b, 2] int32      real tokens of each side
      weight        [b] f32           1 for a pair, 0 for a copy that fills up the last eval batch
      ref_logps     [b, 2] f32        the precomputed reference's log-probs (with a reference table only)
    Rows of several sequences (_packed: prefix_sharing, packing or both), R rows of W tokens, up to K pairs a
    row. With prefix sharing a pair's sequence is [shared | chosen tail | rejected tail]: its first shared
    length - 1 tokens once, then each side from there on (the last shared token starts both tails, so every
    position has one next token); without it, [chosen | rejected]:
      input_ids     [R, W] int32      the rows' tokens, 0 after the last pair
      positions     [R, W] int32      each token's position within its side's sequence
      targets       [R, W] int32      the next token in that sequence (0 at its end)
      target_mask   [R, W] bool       True: that target is scored
      pair          [R, W] int32      the token's pair slot in its row, -1 for padding
      side          [R, W] int32      SHARED (run once, counts for both sides), CHOSEN or REJECTED
      views         [R, 2K, S] int32  the row positions of pair k's chosen (view 2k) and rejected (view
                                      2k + 1) sequences, S wide: what attention runs over
      view_lengths  [R, 2K] int32     real tokens of each view
      slot          [R, W] int32      the flat view position (view * S + position) each token takes its
                                      attention output from
      weight        [R, K] f32        1 for a pair, 0 for an empty slot or a fill-up copy
      lengths       [R, K, 2] int32   real tokens of each pair's chosen and rejected sequences
      ref_logps     [R, K, 2] f32     the precomputed reference's log-probs (with a reference table only)
    """

    prefix_sharing: bool = False
    packing: bool = False
    row_multiple: int = 1
    width_multiple: int = 1


# Batch shapes a run compiles (plan_shapes), each a program: on an accelerator a compile costs seconds to
# minutes, a few steps' time or more, so a few shapes beat a little less padding.
TRAIN_SHAPES, EVAL_SHAPES = 4, 2


class Shape(NamedTuple):
    """A batch's array shape, and so one compiled program: `rows` x `width` tokens (global, over every
    process). One pair a row (the plain layout): input_ids [rows, 2, width]. Rows of several sequences
    (prefix sharing, packing): input_ids [rows, width], up to `slots` pairs a row, each sequence's
    attention view `view_width` tokens wide."""

    rows: int
    width: int
    slots: int = 0
    view_width: int = 0

    def holds(self, need: "Shape") -> bool:
        """Whether a batch whose smallest shape is `need` fits in this one."""
        if not self.slots:  # one pair a row: the rows are the batch's pairs
            return self.rows == need.rows and self.width >= need.width
        return all(ours >= theirs for ours, theirs in zip(self, need, strict=True))


def _is_rows(layout: Layout | None) -> bool:
    return layout is not None and (layout.prefix_sharing or layout.packing)


def _units(dataset, pairs, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(tokens each pair takes in a row, tokens of its shared prefix written once). With prefix sharing a
    pair's row sequence is [shared | chosen tail | rejected tail]: the first `shared - 1` tokens once."""
    lengths = dataset.lengths[pairs]
    once = np.maximum(dataset.shared[pairs] - 1, 0) if layout.prefix_sharing else np.zeros(len(pairs), int)
    return lengths.sum(1) - once, once


def _rows_of(units, layout: Layout, max_seq_len: int, row_slices: int):
    """(each row's pair positions, the rows' width, their number rounded up to a whole multiple). Packing:
    pairs go first-fit, longest first, into as few rows as hold everything at up to 2 * max_seq_len tokens,
    in whole multiples, the rows widening a step at a time while first-fit spills into more (a spilled row
    would cost a whole multiple). Without packing, one pair a row."""
    multiple, cap = math.lcm(layout.row_multiple, row_slices), 2 * max_seq_len
    padded = functools.partial(padded_width, max_seq_len=cap, multiple=layout.width_multiple)
    if not layout.packing:
        rows, width = [[k] for k in range(len(units))], padded(int(units.max()))
    else:
        tokens = int(units.sum())
        least = -(-tokens // (cap * multiple)) * multiple
        width = padded(max(int(units.max()), -(-tokens // least)))
        while len(rows := _first_fit(units, width)) > least and width < cap:
            width = padded(width + 1)
    return rows, width, -(-len(rows) // multiple) * multiple


def _need(dataset, pairs, weight, layout, max_seq_len, row_slices) -> tuple[Shape, list | None]:
    """The smallest shape that holds this batch, each dimension rounded as padded_width rounds it, and for
    rows of several sequences the rows (_rows_of) that _packed fills, planned once."""
    longest = int(dataset.lengths[pairs].max())
    view_width = padded_width(longest, max_seq_len, layout.width_multiple if layout else 1)
    if not _is_rows(layout):
        return Shape(len(pairs), view_width), None
    if layout.packing:  # the weight-0 copies that fill up an eval batch would only take room
        pairs = pairs[weight > 0]
    rows, width, total = _rows_of(_units(dataset, pairs, layout)[0], layout, max_seq_len, row_slices)
    slots = 1 << (max(map(len, rows)) - 1).bit_length()  # a power of two: few distinct shapes
    return Shape(total, width, slots, view_width), rows


def plan_shapes(dataset, steps, *, count: int, max_seq_len: int, layout=None, row_slices=1) -> list[Shape]:
    """At most `count` shapes that hold every batch of `steps` ((pair indices, weights) per batch), with
    the least padding: each batch's smallest shape (_need), sorted by size, cut into at most `count` runs,
    each run served by the envelope of its shapes (the largest of every dimension). Where to cut is chosen
    exactly (dynamic programming over the cuts) to minimise the tokens of every batch at its run's shape.
    Rows, widths, pair slots and view widths thus come from the same batches, not rounded apart."""
    steps = list(steps)
    _check_lengths(dataset, np.concatenate([pairs for pairs, _ in steps]), max_seq_len)  # before any compile
    needs = Counter(_need(dataset, p, w, layout, max_seq_len, row_slices)[0] for p, w in steps)
    shapes = sorted(needs, key=lambda s: (s.rows * s.width, s))
    runs = {}  # (i, j) -> (tokens of the batches of shapes i..j at their envelope, the envelope)
    for i in range(len(shapes)):
        top, batches = shapes[i], 0
        for j in range(i, len(shapes)):
            top, batches = Shape(*map(max, top, shapes[j])), batches + needs[shapes[j]]
            runs[i, j] = (top.rows * top.width * batches, top)
    # best[j]: (tokens, shapes) of the cheapest plan for shapes 0..j, with one more run allowed each round
    best = [(runs[0, j][0], [runs[0, j][1]]) for j in range(len(shapes))]
    for _ in range(count - 1):
        best = [
            min(
                [best[j]]
                + [(best[i][0] + runs[i + 1, j][0], best[i][1] + [runs[i + 1, j][1]]) for i in range(j)]
            )
            for j in range(len(shapes))
        ]
    return list(dict.fromkeys(best[-1][1]))  # two runs may end in the same envelope


def _check_lengths(dataset, indices, max_seq_len: int) -> None:
    longest = int(dataset.lengths[indices].max()) if len(indices) else 0
    if longest > max_seq_len:
        raise ValueError(f"{dataset.path} has pairs of {longest} tokens, over max_seq_len {max_seq_len}")


def _batches(dataset, indices, steps, max_seq_len, reference, layout, row_slice, row_slices, shapes):
    """This process's share of each (global pair indices, weights) batch from `steps`, as the contract's batch
    dict; with a `reference` table ([len(dataset), 2], precomputed reference log-probs), also its rows. Each
    batch takes the smallest of `shapes` that holds it (without `shapes`, or where none does, its own
    smallest shape). One pair a row (_padded), or with a `layout` that shares prefixes or packs, rows of
    several sequences (_packed)."""
    _check_lengths(dataset, indices, max_seq_len)  # here, when the loader is made, not at its first batch
    where = dict(reference=reference, row_slice=row_slice, row_slices=row_slices)

    def lay_out(pairs, weight):
        need, rows = _need(dataset, pairs, weight, layout, max_seq_len, row_slices)
        shape = min((s for s in shapes or () if s.holds(need)), key=lambda s: s.rows * s.width, default=need)
        if _is_rows(layout):
            return _packed(dataset, pairs, weight, layout=layout, shape=shape, rows=rows, **where)
        return _padded(dataset, pairs, weight, shape=shape, **where)

    return (lay_out(pairs, weight) for pairs, weight in steps)


def blank_batch(shape: Shape, reference=False, row_slices=1) -> dict[str, np.ndarray]:
    """This process's share of a batch of `shape`, all zeros (padding): what a batch of that shape holds,
    for compiling its program before any batch is read."""
    r = shape.rows // row_slices
    if not shape.slots:
        batch = dict(
            input_ids=np.zeros((r, 2, shape.width), np.int32), loss_mask=np.zeros((r, 2, shape.width), bool)
        )
        batch |= dict(lengths=np.zeros((r, 2), np.int32), weight=np.zeros(r, np.float32))
        return batch | (dict(ref_logps=np.zeros((r, 2), np.float32)) if reference else {})
    per_row, view_width = shape.slots, shape.view_width
    out = {
        k: np.zeros((r, shape.width), np.int32) for k in ("input_ids", "positions", "targets", "side", "slot")
    }
    out |= dict(
        target_mask=np.zeros((r, shape.width), bool),
        pair=np.full((r, shape.width), -1, np.int32),
        views=np.zeros((r, 2 * per_row, view_width), np.int32),
        view_lengths=np.zeros((r, 2 * per_row), np.int32),
        weight=np.zeros((r, per_row), np.float32),
        lengths=np.zeros((r, per_row, 2), np.int32),
    )
    return out | (dict(ref_logps=np.zeros((r, per_row, 2), np.float32)) if reference else {})


def shape_of(batch: dict) -> Shape:
    """The Shape of a batch, rows as its arrays hold them (global for dpo's global arrays)."""
    if "views" not in batch:
        return Shape(*batch["input_ids"].shape[::2])
    (rows, width), (_, views, view_width) = batch["input_ids"].shape, batch["views"].shape
    return Shape(rows, width, views // 2, view_width)


def _padded(dataset, pairs, weight, reference, row_slice, row_slices, shape: Shape):
    """This process's pairs, one a row, in `shape` (Layout describes the arrays)."""
    size = len(pairs) // row_slices
    mine = slice(row_slice * size, (row_slice + 1) * size)
    # [b, 2, T], not [2b, T]: sharding the leading dim keeps both sequences of a pair on one device.
    batch = blank_batch(shape, reference=reference is not None, row_slices=row_slices)
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    for i, sides in enumerate(dataset.read(pairs[mine])):
        for s, (ids, mask) in enumerate(sides):
            input_ids[i, s, : len(ids)], loss_mask[i, s, : len(ids)] = ids, mask
    batch["lengths"][:], batch["weight"][:] = dataset.lengths[pairs[mine]], weight[mine]
    if reference is not None:
        batch["ref_logps"][:] = reference[pairs[mine]]
    return batch


def _packed(dataset, pairs, weight, reference, row_slice, row_slices, layout, shape, rows):
    """The pairs as rows of sequences (Layout describes the arrays), laid out in `shape`, one that holds them:
    empty rows, slots and tokens are padding. Packing puts several pairs in a row (_rows_of); else one pair a
    row; `rows` are _need's plan of them (positions among the pairs of weight > 0 when packing). The plan
    depends only on the global batch's lengths, so every process makes the same and fills its own rows."""
    if layout.packing:  # the weight-0 copies that fill up an eval batch would only take room
        pairs, weight = pairs[weight > 0], weight[weight > 0]
    lengths, prefixes = dataset.lengths[pairs], _units(dataset, pairs, layout)[1]
    rows = rows + [[] for _ in range(shape.rows - len(rows))]
    rows = rows[row_slice * shape.rows // row_slices : (row_slice + 1) * shape.rows // row_slices]
    out = blank_batch(shape, reference is not None, row_slices)
    view_width, order = shape.view_width, [k for row in rows for k in row]
    read = dict(zip(order, dataset.read(pairs[order]), strict=True))
    for i, row in enumerate(rows):
        at = 0  # where the next pair starts in the row
        for j, k in enumerate(row):
            # prefix: the tokens that run once (the shared length - 1; 0 without prefix sharing)
            ((chosen, chosen_mask), (rejected, rejected_mask)), prefix = read[k], prefixes[k]
            c, n = len(chosen), len(chosen) + len(rejected) - prefix
            row_span = slice(at, at + n)
            out["input_ids"][i, row_span] = np.r_[chosen, rejected[prefix:]]
            positions = np.r_[np.arange(c), np.arange(prefix, len(rejected))]
            out["positions"][i, row_span] = positions
            out["targets"][i, row_span] = np.r_[chosen[1:], 0, rejected[prefix + 1 :], 0]
            out["target_mask"][i, row_span] = np.r_[chosen_mask[1:], 0, rejected_mask[prefix + 1 :], 0]
            out["pair"][i, row_span] = j
            sides = np.full(prefix, SHARED), np.full(c - prefix, CHOSEN), np.full(n - c, REJECTED)
            out["side"][i, row_span] = np.concatenate(sides)
            # chosen tokens read view 2j, the rejected tail view 2j + 1
            out["slot"][i, row_span] = positions + view_width * (2 * j + (np.arange(n) >= c))
            out["views"][i, 2 * j, :c] = at + np.arange(c)
            out["views"][i, 2 * j + 1, : len(rejected)] = np.r_[at + np.arange(prefix), at + np.arange(c, n)]
            out["view_lengths"][i, 2 * j : 2 * j + 2] = c, len(rejected)
            out["weight"][i, j], out["lengths"][i, j] = weight[k], lengths[k]
            if reference is not None:
                out["ref_logps"][i, j] = reference[pairs[k]]
            at += n
    return out


def _first_fit(units: np.ndarray, width: int) -> list[list[int]]:
    """Sequences of `units` tokens into rows of `width`: longest first, each into the first row it fits."""
    rows, free = [], []
    for k in np.argsort(-units, kind="stable"):
        fits = next((r for r, room in enumerate(free) if units[k] <= room), len(rows))
        if fits == len(rows):
            rows.append([])
            free.append(width)
        rows[fits].append(k)
        free[fits] -= units[k]
    return rows


def padded_width(longest: int, max_seq_len: int, multiple: int = 1) -> int:
    """The width of a batch whose longest sequence has `longest` tokens: a multiple of 8 up to 64, then 8
    widths to an octave (72, 80, ..., 128, 144, ..., 256, 288, ...), at most max_seq_len. Padding stays
    under 1/8 while a run compiles few shapes (bench.py padding, UltraFeedback-like lengths: 6 widths for
    random batches of 128 pairs, 25 with group_by_length; 1-6 on short data, where widths rounded up to
    multiples of 128 had doubled the work). Coarser steps (4 to an octave) compile half as many shapes but
    pad 4% more; exact widths pad 4% less but compile a shape for nearly every batch. A multiple of `multiple`
    (the context axis's size), max_seq_len rounded up to one."""
    step = math.lcm(max(8, 2 ** ((longest - 1).bit_length() - 4)), multiple)
    return min(-(-longest // step) * step, -(-max_seq_len // multiple) * multiple)


def by_length(dataset: PairDataset, indices: Sequence[int]) -> np.ndarray:
    """`indices` from the shortest pair to the longest (a pair's length: its longer side, which sets its
    padded width), ties kept in the given order."""
    indices = np.asarray(indices, np.int64)
    return indices[np.argsort(dataset.lengths[indices].max(axis=1), kind="stable")]


def train_order(dataset, indices, *, batch_size, seed, group_by_length=False, window=64):
    """step -> (global pair indices, weights) of that step's batch of batch_size pairs, reshuffled each epoch
    from (seed, epoch). Step s is computed, not reached by reading steps before it, so a resumed run
    continues exactly and a run can plan its shapes before step 1. Each epoch leaves out its last partial
    batch (a different remainder each epoch).

    group_by_length: each epoch's shuffled pairs are sorted by length within runs of `window` batches, cut
    into batches, and those batches shuffled again. A batch then holds pairs of like length and pads far
    less; each epoch still covers the same pairs once, and batch order stays random beyond the window."""
    indices = np.asarray(indices, np.int64)
    steps_per_epoch = len(indices) // batch_size
    if not steps_per_epoch:
        raise ValueError(f"{len(indices)} training pairs are fewer than one batch of {batch_size}")

    @functools.lru_cache(maxsize=1)  # one order per epoch
    def order(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch])
        pairs = rng.permutation(indices)[: steps_per_epoch * batch_size]
        if group_by_length:
            run = window * batch_size
            sorted_runs = (by_length(dataset, pairs[at : at + run]) for at in range(0, len(pairs), run))
            pairs = np.concatenate([rng.permutation(r.reshape(-1, batch_size)) for r in sorted_runs])
        return pairs.reshape(-1, batch_size)  # [steps_per_epoch, batch_size]

    weight = np.ones(batch_size, np.float32)
    return lambda step: (order(step // steps_per_epoch)[step % steps_per_epoch], weight)


def train_batches(
    dataset: PairDataset,
    indices: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    row_slice: int = 0,
    row_slices: int = 1,
    max_seq_len: int,
    group_by_length: bool = False,
    window: int = 64,
    reference: np.ndarray | None = None,
    layout: Layout | None = None,
    shapes: Sequence[Shape] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of train_order's steps from start_step on, each in the smallest of `shapes` that
    holds it (plan_shapes; without them, each in its own smallest shape)."""
    order = train_order(
        dataset, indices, batch_size=batch_size, seed=seed, group_by_length=group_by_length, window=window
    )
    steps = map(order, itertools.count(start_step))
    where = (reference, layout, row_slice, row_slices, shapes)
    return _batches(dataset, np.asarray(indices, np.int64), steps, max_seq_len, *where)


def eval_order(indices: Sequence[int], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One pass over `indices` in order, as (pair indices, weights) batches. The last batch is filled up
    with copies of a real pair at weight 0 (copies, not empty rows, so padding never feeds the model a
    sequence of length 0; packed rows leave them out)."""
    indices = np.asarray(indices, np.int64)
    chunks = (indices[at : at + batch_size] for at in range(0, len(indices), batch_size))
    return [
        (np.resize(pairs, batch_size), np.float32(np.arange(batch_size) < len(pairs))) for pairs in chunks
    ]


def eval_batches(
    dataset: PairDataset,
    indices: Sequence[int],
    *,
    batch_size: int,
    row_slice: int = 0,
    row_slices: int = 1,
    max_seq_len: int,
    reference: np.ndarray | None = None,
    layout: Layout | None = None,
    shapes: Sequence[Shape] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """eval_order's batches, each in the smallest of `shapes` that holds it (as train_batches)."""
    steps = eval_order(indices, batch_size)
    where = (reference, layout, row_slice, row_slices, shapes)
    return _batches(dataset, np.asarray(indices, np.int64), steps, max_seq_len, *where)


def main():
    try:
        summary = tyro_cli(tokenize)
    except (ValueError, OSError) as e:  # a user mistake, a full disk: one line, no traceback
        if isinstance(e, OSError) and e.filename:
            e = f"{e.filename}: {e.strerror or e} (a full disk? --output is left as it was)"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({key: value for key, value in summary.items() if key != "settings"}, indent=2))


if __name__ == "__main__":
    main()
