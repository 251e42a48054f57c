"""Chat templates are code that came with a model or an adapter: a render that loops for hours
is stopped at its time budget, one that multiplies the conversation at its output budget, and
either stops the command with one line instead of freezing it."""

from __future__ import annotations

import threading
import time

import pytest
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.data.budget import OverBudget, time_budget
from hydra_edge.data.records import RENDER_SECONDS, render_chat
from hydra_edge.errors import TemplateOverBudget
from hydra_edge.models.tiny import DEMO_TRAIN

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
# No function call inside the loops: nothing Jinja's sandbox could intercept runs per iteration.
LIST_LOOPS = "{% set r = range(100000) | list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"
MULTIPLIER = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}"
CONVERSATION = [{"role": "user", "content": "Hi " * 50}, {"role": "assistant", "content": "Hello"}]


def _spin() -> None:
    while True:
        pass


def test_a_loop_that_never_ends_is_stopped_at_its_budget():
    started = time.monotonic()
    with pytest.raises(OverBudget), time_budget(0.2):
        _spin()
    assert time.monotonic() - started < 2


def test_the_budget_stops_a_loop_on_another_thread_and_leaves_the_main_thread_alone():
    outcome = []

    def work():
        try:
            with time_budget(0.2):
                _spin()
        except OverBudget:
            outcome.append("stopped")

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(5)
    assert outcome == ["stopped"] and not worker.is_alive()


def test_blocks_that_end_near_their_deadline_never_leak_an_exception_afterwards():
    # Each block ends just around its deadline; whichever way the race goes, the exception is
    # either raised by time_budget itself or withdrawn: none lands in the code after it.
    late = 0
    for _ in range(500):
        try:
            with time_budget(0.001):
                deadline = time.monotonic() + 0.001
                while time.monotonic() < deadline:
                    pass
        except OverBudget:
            late += 1
        for _ in range(2000):  # plenty of bytecodes for a stray exception to land in
            pass
    assert 0 <= late <= 500
    # and the watchdog still keeps time: no race above left it stuck
    with pytest.raises(OverBudget), time_budget(0.2):
        _spin()


@pytest.fixture
def tokenizer_with(tiny_tokenizer):
    def make(template: str):
        tiny_tokenizer.chat_template = template
        return tiny_tokenizer

    return make


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("template", [NESTED_LOOPS, LIST_LOOPS])
def test_a_template_that_loops_for_hours_is_a_template_error(tokenizer_with, template):
    started = time.monotonic()
    with pytest.raises(TemplateOverBudget, match=f"within {RENDER_SECONDS:g} s"):
        render_chat(tokenizer_with(template), CONVERSATION)
    assert time.monotonic() - started < RENDER_SECONDS + 3


def test_a_template_that_multiplies_the_conversation_is_a_template_error(tokenizer_with):
    with pytest.raises(TemplateOverBudget, match="turned a conversation of"):
        render_chat(tokenizer_with(MULTIPLIER), CONVERSATION)


def test_real_templates_render_within_budget(tokenizer_with):
    from hydra_edge.data.chat_templates import TEMPLATES

    for template in TEMPLATES.values():
        assert "Hello" in render_chat(tokenizer_with(template), CONVERSATION)


@pytest.mark.parametrize("command", ["data preview", "finetune"])
def test_commands_that_render_every_row_stop_at_the_first_with_one_line(tmp_path, command):
    template = tmp_path / "hang.jinja"
    template.write_text(NESTED_LOOPS)
    started = time.monotonic()
    args = [*command.split(), "--data", str(DEMO_TRAIN), "--chat-template", str(template)]
    if command == "finetune":
        args += ["--out", str(tmp_path / "run")]
    result = run_in_process(*args)
    assert_one_line_error(result, "chat template", f"within {RENDER_SECONDS:g} s")
    assert time.monotonic() - started < 60  # one row's budget, not one per row (396 rows: 13 min)
