"""Ollama Modelfiles: the Go templates derived from Jinja chat templates, run through a small
interpreter of the Go text/template constructs go_template emits and compared with Jinja's
rendering; Modelfiles read back as Ollama's parser (parser/parser.go) reads them."""

from __future__ import annotations

import json
import re

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hydra_edge.data.chat_templates import FALLBACK, TEMPLATES
from hydra_edge.exporters.ollama import NO_TEMPLATE, go_template, modelfile, parse_modelfile
from hydra_edge.models.tiny import CHAT_TEMPLATE as TINY

GO_SPACE = " \t\r\n"
CONVERSATIONS = [
    [("user", "What is 2+2?")],
    [("system", "Be brief."), ("user", 'He said "hi"\nand left.')],
    [("user", "Hello"), ("assistant", "Hi! {{ .Content }} is not a template here."), ("user", "Thanks — bye")],
    [("system", "You answer in French.\nAlways."), ("user", "Hi"), ("assistant", "Bonjour"), ("user", "a\\b")],
]
# name -> (template, bos_token, eos_token), as a tokenizer of that family would pass them
EXPRESSIBLE = {
    "tiny": (TINY, None, "</s>"),
    "chatml": (TEMPLATES["chatml"], None, "<|im_end|>"),
    "llama3": (TEMPLATES["llama3"], "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (TEMPLATES["gemma"], "<bos>", "<eos>"),
}
NUMBERED = (
    "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ (messages | length) + 1 }}. assistant:{% endif %}"
)


# --- a Go text/template interpreter for exactly what go_template emits --------------------------


def go_tokens(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", body) pieces, with {{- and -}} trimming applied to the text."""
    pieces, position, trim_next = [], 0, False
    for match in re.finditer(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", template, re.S):
        text = template[position : match.start()]
        text = text.lstrip(GO_SPACE) if trim_next else text
        pieces += [("text", text.rstrip(GO_SPACE) if match.group(1) else text), ("action", match.group(2))]
        trim_next, position = bool(match.group(3)), match.end()
    tail = template[position:]
    return [*pieces, ("text", tail.lstrip(GO_SPACE) if trim_next else tail)]


def go_nodes(tokens, i: int) -> tuple[list, int]:
    """Nodes from tokens[i] up to the next end / else / else if at this level (its index)."""
    nodes = []
    while i < len(tokens):
        kind, body = tokens[i]
        if kind == "action" and (body in ("end", "else") or body.startswith("else if ")):
            return nodes, i
        if kind == "action" and body.startswith(("if ", "range ")):
            node, i = go_block(tokens, i)
            nodes.append(node)
        else:
            nodes.append((kind, body))
            i += 1
    return nodes, i


def go_block(tokens, i: int) -> tuple[tuple, int]:
    """An if (with its else-if chain and else) or a range, from its opening action to its end."""
    head = tokens[i][1].removeprefix("else ")
    body, j = go_nodes(tokens, i + 1)
    assert j < len(tokens), f"{head!r} has no end"
    stop = tokens[j][1]
    if head.startswith("range "):
        assert head == "range .Messages" and stop == "end", f"unsupported range: {head!r}"
        return ("range", head, body, []), j + 1
    if stop == "end":
        return ("if", head[3:], body, []), j + 1
    if stop == "else":
        other, k = go_nodes(tokens, j + 1)
        assert tokens[k][1] == "end"
        return ("if", head[3:], body, other), k + 1
    nested, k = go_block(tokens, j)  # else if C: an if C inside the else
    return ("if", head[3:], body, [nested]), k


def go_value(expression: str, dot: dict, variables: dict):
    if expression.startswith('"'):
        return json.loads(expression)
    if expression in (".Role", ".Content"):
        return dot[expression[1:]]
    if expression in variables:
        return variables[expression]
    raise AssertionError(f"unsupported value: {expression!r}")


def go_run(nodes, dot: dict, variables: dict, out: list[str]) -> None:
    for kind, body, *branches in nodes:
        if kind == "text":
            out.append(body)
        elif kind == "range":
            for message in dot["Messages"]:
                go_run(branches[0], message, variables, out)
        elif kind == "if":
            words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', body)
            assert len(words) == 3 and words[0] == "eq", f"unsupported condition: {body!r}"
            chosen = go_value(words[1], dot, variables) == go_value(words[2], dot, variables)
            go_run(branches[0] if chosen else branches[1], dot, variables, out)
        elif assignment := re.fullmatch(r"(\$\w+) :?= (\S+)", body):
            variables[assignment.group(1)] = go_value(assignment.group(2), dot, variables)
        elif body == ".Content":
            out.append(dot["Content"])
        else:
            raise AssertionError(f"unsupported action: {body!r}")


def go_render(template: str, messages: list[tuple[str, str]]) -> str:
    tokens = go_tokens(template)
    nodes, end = go_nodes(tokens, 0)
    assert end == len(tokens), f"unmatched {tokens[end]!r}"
    out: list[str] = []
    go_run(nodes, {"Messages": [{"Role": r, "Content": c} for r, c in messages]}, {}, out)
    return "".join(out)


def jinja_render(template: str, messages, bos_token: str | None, eos_token: str | None) -> str:
    """What transformers' apply_chat_template renders for generation, less the leading BOS."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(
        messages=[{"role": role, "content": content} for role, content in messages],
        add_generation_prompt=True,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
    return text.removeprefix(bos_token) if bos_token else text


def test_the_interpreter_follows_go_trimming_and_rejects_what_it_does_not_know():
    template = 'a \n{{- range .Messages }}[{{ .Content }}]{{ end }} {{ if eq "x" "y" }}no{{ else }}yes{{ end }}'
    assert go_render(template, [("user", "m"), ("user", "n")]) == "a[m][n] yes"
    with pytest.raises(AssertionError, match="unsupported"):
        go_render("{{ range $i, $m := .Messages }}{{ end }}", [])
    with pytest.raises(AssertionError, match="unsupported"):
        go_render("{{ .System }}", [])


# --- go_template --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPRESSIBLE))
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system-user", "u-a-u", "s-u-a-u"])
def test_the_go_template_renders_what_jinja_renders(name, conversation):
    template, bos, eos = EXPRESSIBLE[name]
    go = go_template(template, bos)
    assert go is not None
    assert go_render(go, conversation) == jinja_render(template, conversation, bos, eos)


def test_the_bos_token_is_left_to_the_runtime():
    go = go_template(TEMPLATES["llama3"], "<|begin_of_text|>")
    assert "<|begin_of_text|>" not in go and go.startswith("{{- range .Messages }}")
    assert go_template(TEMPLATES["gemma"], "<bos>").find("<bos>") == -1


def test_gemma_opens_the_first_user_turn_with_the_system_message():
    go = go_template(TEMPLATES["gemma"], "<bos>")
    assert '{{ if eq $prev "system" }}\n\n{{ else }}<start_of_turn>user\n{{ end }}' in go
    rendered = go_render(go, [("system", "S"), ("user", "U")])
    assert rendered == "<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n"


def test_tiny_template_gives_the_plain_role_wrappers():
    assert go_template(TINY) == (
        '{{- range .Messages }}{{ if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
        '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n'
        '{{ else if eq .Role "system" }}<|system|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}<|assistant|>\n'
    )


def test_an_eos_token_in_the_template_must_be_given():
    assert go_template(FALLBACK) is None
    go = go_template(FALLBACK, eos_token="</s>")
    for conversation in CONVERSATIONS:
        assert go_render(go, conversation) == jinja_render(FALLBACK, conversation, None, "</s>")


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(NUMBERED, id="numbered-turns"),
        pytest.param(TEMPLATES["qwen2.5"], id="qwen2.5-default-system"),
        pytest.param("{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}", id="changes-content"),
        pytest.param("{% for m in messages %}{{ '{{' + m['content'] }}\n{% endfor %}", id="go-delimiters"),
        pytest.param("{{ raise_exception('no') }}", id="raises"),
        pytest.param("{% for m in messages %}{{ m['content'] }}", id="syntax-error"),
    ],
)
def test_templates_that_cannot_be_written_give_none(template):
    assert go_template(template) is None


def test_qwen_default_system_prompt_is_why_it_gives_none():
    # With a system message it is chatml; without one Qwen's default system prompt comes first,
    # which the Go template could only add with a check of the first message's role.
    qwen = TEMPLATES["qwen2.5"]
    assert jinja_render(qwen, CONVERSATIONS[0], None, None).startswith("<|im_start|>system\nYou are Qwen")
    assert jinja_render(qwen, CONVERSATIONS[1], None, None) == jinja_render(
        TEMPLATES["chatml"], CONVERSATIONS[1], None, None
    )


# --- modelfile and parse_modelfile --------------------------------------------------------------


def test_a_modelfile_reads_back():
    template = 'Say "hi" to {{ .Content }}\n  indented line\nlast "quoted" line\n'
    stops = ["<|end|>", 'say "stop"', "back\\slash", "</s>"]
    text = modelfile("../base q4.gguf", "../adapters/cluster_0.gguf", template, stops, comment="cluster 0\nsecond")
    assert text.startswith("# cluster 0\n# second\nFROM ../base q4.gguf\nADAPTER ../adapters/cluster_0.gguf\n")
    assert 'PARAMETER stop "<|end|>"\n' in text and "temperature" not in text.lower()
    assert parse_modelfile(text) == {
        "from": "../base q4.gguf",
        "adapter": "../adapters/cluster_0.gguf",
        "template": template,
        "parameters": [("stop", stop) for stop in stops],
    }


def test_a_derived_template_reads_back_from_its_modelfile():
    for template, bos, _ in EXPRESSIBLE.values():
        go = go_template(template, bos)
        assert parse_modelfile(modelfile("b.gguf", "a.gguf", go, ["<eos>"]))["template"] == go


def test_without_a_template_the_modelfile_says_so():
    text = modelfile("b.gguf", "a.gguf", None, [])
    assert NO_TEMPLATE in text.splitlines() and "TEMPLATE " not in text.replace(NO_TEMPLATE, "")
    assert parse_modelfile(text) == {"from": "b.gguf", "adapter": "a.gguf", "template": None, "parameters": []}


def test_values_that_need_the_other_quotes_or_cannot_be_quoted():
    text = modelfile(" spaced.gguf", "a.gguf", "x", ['"', 'ends "\nnext'])
    assert parse_modelfile(text)["from"] == " spaced.gguf"
    assert parse_modelfile(text)["parameters"] == [("stop", '"'), ("stop", 'ends "\nnext')]
    assert parse_modelfile(modelfile("b.gguf", "a.gguf", 'a """ b', []))["template"] == 'a """ b'
    for template in ('ends """\nnext', "a NUL \x00 is dropped by Ollama"):
        with pytest.raises(ValueError, match="cannot be written in a Modelfile"):
            modelfile("b.gguf", "a.gguf", template, [])


@pytest.mark.parametrize(
    "line, value",
    [  # from Ollama's parser_test.go (TestParseFileParameters)
        ("stop ### User:", "### User:"),
        ("stop ### User: ", "### User:"),
        ('stop "### User:"', "### User:"),
        ('stop "### User: "', "### User: "),
        ('stop """### User:"""', "### User:"),
        ('stop """### User:\n"""', "### User:\n"),
        ("stop <|eot_id|>", "<|eot_id|>"),
    ],
)
def test_parameters_read_as_ollama_reads_them(line, value):
    assert parse_modelfile(f"FROM foo\nPARAMETER {line}\n")["parameters"] == [("stop", value)]


def test_ollama_syntax_is_read():
    text = (
        "\ufeff# comment\n  # indented comment\nfrom   FOOO BAR   \r\nAdapter\t./a.gguf\nLICENSE MIT\n"
        'template """   {{ .Prompt }}\n\n{{ .Response }}   """    \nMESSAGE user Hey there!\n'
        'SYSTEM """\nmulti "line"\n"""\nPARAMETER num_ctx 4096\nPARAMETER stop "a # b"'
    )
    assert parse_modelfile(text) == {
        "from": "FOOO BAR",
        "adapter": "./a.gguf",
        "template": "   {{ .Prompt }}\n\n{{ .Response }}   ",
        "parameters": [("num_ctx", "4096"), ("stop", "a # b")],
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("ADAPTER a.gguf\nPARAMETER stop x\n", "no FROM line"),
        ("", "no FROM line"),
        ('FROM b\nTEMPLATE """{{ .Prompt }}\nPARAMETER stop x\n', "line 2: TEMPLATE's quoted value is never closed"),
        ('FROM b\nTEMPLATE """a""\n', "never closed"),
        ('FROM b\nPARAMETER stop "x\n', "never closed"),
        ("FROM b\nBADCOMMAND x\n", "line 2: 'BADCOMMAND x' is not an instruction"),
        ("FROM\n", "line 1"),
        ("FROM b\nPARAMETER stop\n", "PARAMETER needs a name and a value"),
        ("FROM b\nMESSAGE badguy hi\n", "MESSAGE needs a role"),
    ],
)
def test_a_malformed_modelfile_raises_one_clear_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        parse_modelfile(text)
    assert "\n" not in str(raised.value)
