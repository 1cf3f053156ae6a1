"""An API request body turned into an engine `Request`: prompt ids, limits, sampling, draft policy.
Every problem is an ApiError naming the parameter."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from jinja2 import TemplateError

from daemon.engine.grammar import Grammar, GrammarError
from daemon.engine.records import Request
from daemon.engine.sampling import SamplingParams
from daemon.models.prompts import encode_chat, encode_text, render_messages, system_prefix_length
from daemon.server.openai_shapes import ApiError, ChatRequest, CompletionRequest, PromptTooLong
from daemon.server.structured import response_grammar, tool_call_grammar
from daemon.server.tool_calls import ToolCalls, tool_format
from daemon.server.worker import ServedModel
from daemon.settings import Settings
from policies.registry import check as check_policy

BILLING_HEADER = re.compile(r"\s*x-anthropic-billing-header:(?:\s*[\w.-]+=[^;\n]*;)*[ \t]*\n?")


@dataclass
class Prepared:
    """A validated API request, ready for the engine."""

    body: ChatRequest | CompletionRequest
    request: Request
    speculation: str
    kind: str  # "chat" | "completion"
    tool_calls: ToolCalls | None = None  # reads calls back out of the answer (chat with tools)
    aliased: bool = False  # it named another model, one of the model_aliases setting's: the loaded one answers


def default_speculation(served: ServedModel, settings: Settings) -> str:
    return (served.speculation or settings.speculation) if served.drafter is not None else "off"


def _followable(served: ServedModel, grammar: str | None, param: str) -> str | None:
    """`grammar`, once llguidance has followed it toward completion from the start (a 400 if not)."""
    if grammar is not None:
        try:
            Grammar(served.tokenizer, grammar, served.vocab_size).check()
        except GrammarError as e:
            raise ApiError(400, f"{param}: the schema is too complex to follow: {e}", param, "grammar_too_complex") from None
    return grammar


def without_billing_header(messages: list[dict]) -> list[dict]:
    """`messages` without the line of billing data Claude Code starts its system prompt with
    (`x-anthropic-billing-header: cc_version=...; cc_entrypoint=cli; cch=...;`, its own text block,
    so joined to the next one without a line break): it changes with every request, so it would
    defeat the prompt cache from the first token on, and it tells the model nothing."""
    if not messages or messages[0]["role"] != "system" or not (found := BILLING_HEADER.match(messages[0]["content"])):
        return messages
    rest = messages[0]["content"][found.end() :]
    return ([{**messages[0], "content": rest}] if rest else []) + messages[1:]


def turn_ends(tokenizer, messages: list[dict], tools: list[dict] | None, ids: list[int]) -> tuple[int, ...]:
    """Where a later request of the same conversation will still agree with `ids`: the end of the
    messages up to the last user message, and of all of them, each without the generation prompt
    (a template may write an answer into the history otherwise than its generation prompt opens it:
    Qwen3.5 drops the reasoning). Ends that are not a prefix of `ids` are left out. The prompt cache
    keeps a recurrent model's state there (daemon.engine.prompt_cache)."""
    if not tokenizer.has_chat_template:
        return ()
    rendered, extra = render_messages(tokenizer, messages, tools)
    users = [i for i, m in enumerate(rendered) if m["role"] == "user"]
    ends = set()
    for upto in {len(rendered), users[-1] + 1} if users else {len(rendered)}:
        try:
            part = list(tokenizer.apply_chat_template(rendered[:upto], add_generation_prompt=False, **extra))
        except TemplateError:  # a template that refuses the conversation cut there
            continue
        if len(part) < len(ids) and ids[: len(part)] == part:
            ends.add(len(part))
    return tuple(sorted(ends))


def _chat_ids(served: ServedModel, body: ChatRequest, settings: Settings):
    """(the prompt ids, how many leading ones are a system prompt worth keeping on disk, the reader
    of the answer's tool calls, the grammar the answer follows, `turn_ends`). A forced call
    ("required", a named function) starts in the prompt, the answer continues after the call's
    opening, held to the tools' schemas by a grammar where the format writes calls as JSON."""
    messages, tools, forced = [m.as_dict() for m in body.messages], body.tool_dicts(), body.forced_tool()
    if settings.strip_billing_header:
        messages = without_billing_header(messages)
    ids = encode_chat(served.tokenizer, messages, tools)
    length = system_prefix_length(served.tokenizer, messages, ids, tools)
    ends = turn_ends(served.tokenizer, messages, tools, ids) if served.recurrent else ()
    calls, grammar = None, _followable(served, response_grammar(body.response_format), "response_format")
    if tools:
        fmt = tool_format(served.tokenizer)
        opening = "" if forced is None else fmt.start + "\n" + (f'{{"name": "{forced}", "arguments": ' if forced else "")
        ids += encode_text(served.tokenizer, opening) if opening else []
        calls = ToolCalls(fmt, tools, body.parallel_tool_calls is not False, forced is not None,
                          opening.removeprefix(fmt.start))
        if forced is not None and fmt.json_calls:
            grammar = _followable(served, tool_call_grammar(tools, forced, fmt.end), "tool_choice")
    return ids, length if length >= settings.prompt_cache_min_tokens else 0, calls, grammar, ends


def prompt_ids(body: ChatRequest, served: ServedModel, settings: Settings) -> list[int]:
    """The prompt a chat request becomes, as the model reads it (for counting)."""
    return _chat_ids(served, body, settings)[0]


def _completion_ids(served: ServedModel, body: CompletionRequest) -> list[int]:
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, str):
        return encode_text(served.tokenizer, prompt)
    if any(not 0 <= t < served.vocab_size for t in prompt):
        raise ApiError(400, f"prompt: token ids must be in [0, {served.vocab_size})", "prompt")
    return list(prompt)


MODEL_SUFFIXES = ("adaptive", "adaptive:mtp", "off", "fixed:1", "fixed:2", "fixed:3", "fixed:4")


def split_model(name: str, served: ServedModel) -> tuple[str, str | None]:
    """`<model>` or `<model>:<policy>` (for clients that cannot send `speculation`) -> (model, policy)."""
    if name.lower().startswith(served.name.lower() + ":"):
        return name[: len(served.name)], name[len(served.name) + 1 :]
    return name, None


def _speculation(served: ServedModel, body, settings: Settings, suffix: str | None) -> str:
    if suffix and body.speculation and suffix != body.speculation:
        raise ApiError(400, f"speculation: {body.speculation!r} disagrees with the model's suffix {suffix!r}",
                       "speculation")
    speculation = body.speculation or suffix or default_speculation(served, settings)
    try:
        check_policy(speculation)
    except ValueError as e:
        raise ApiError(400, f"speculation: {e}", "speculation") from None
    if speculation != "off" and served.drafter is None:
        raise ApiError(400, "speculation: this model has no drafter; use 'off'", "speculation")
    return speculation


def prepare(body: ChatRequest | CompletionRequest, served: ServedModel, settings: Settings) -> Prepared:
    model, suffix = split_model(body.model or "", served)
    aliased = bool(model) and model.lower() != served.name.lower()
    if aliased and not any(fnmatch.fnmatchcase(model.lower(), p.lower()) for p in settings.model_aliases):
        raise ApiError(404, f"the model {body.model!r} does not exist; this daemon serves {served.name!r}",
                       "model", "model_not_found")
    chat = isinstance(body, ChatRequest)
    ids, persist, calls, grammar, ends = (_chat_ids(served, body, settings) if chat
                                          else (_completion_ids(served, body), 0, None, None, ()))
    param = "messages" if chat else "prompt"
    if not ids:
        raise ApiError(400, "the prompt is empty", param)
    room = served.context_length - len(ids)
    if room < 1:
        raise PromptTooLong(len(ids), served.context_length, param)
    asked, cap = body.token_limit(), settings.max_tokens_limit
    if asked is not None and cap is not None:  # the operator's cap comes first: past it, nothing is refused
        asked = min(asked, cap)
    if asked is not None and asked > room and settings.context_overflow == "reject":
        raise ApiError(400, f"max_tokens {asked} is past the context left after the prompt ({room} of "
                            f"{served.context_length} tokens)", "max_tokens", "context_length_exceeded")
    max_tokens = min(asked or settings.default_max_tokens, room, cap or room)
    temperature = settings.default_temperature if body.temperature is None else body.temperature
    sampling = SamplingParams(temperature, body.top_p or 1.0, body.top_k or 0,
                              body.seed, body.presence_penalty or 0.0, body.frequency_penalty or 0.0,
                              body.repetition_penalty or 1.0, body.bias(served.vocab_size))
    request = Request(tuple(ids), max_tokens, sampling, body.stops, body.logprob_count(), persist, grammar, ends)
    return Prepared(body, request, _speculation(served, body, settings, suffix), "chat" if chat else "completion", calls,
                    aliased)
