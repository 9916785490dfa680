"""Prompt formatting: the usual MBPP prompt, raw or through the model's chat template.

`render_chat(messages) -> str` is supplied by the model's tokenizer (it applies the chat template and
adds the assistant's generation prompt); this module never imports a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable

from hotcold.errors import InputError
from hotcold.workloads.loaders import normalize_newlines
from hotcold.workloads.tasks import Task

RenderChat = Callable[[list[dict[str, str]]], str]
STYLES = ("chat", "raw")
MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} "
                 "Your code should pass these tests:\n\n{tests}")


# HumanEval for an instruct model: EvalPlus's instruction prompt (the function's signature and docstring
# in a code block); the answer's first fenced block is the program.
HUMANEVAL_TEMPLATE = ("Please provide a self-contained Python script that solves the following problem in a "
                      "markdown code block:\n```\n{prompt}\n```\n")


def pass1_message(task: Task) -> str:
    """The user turn of a pass@1 run: HumanEval's instruction prompt for HumanEval tasks, else MBPP's
    (the task text and its test asserts, `task_message`)."""
    if task.source == "humaneval":
        return HUMANEVAL_TEMPLATE.format(prompt=task.text.strip())
    return task_message(task)


def task_message(task: Task) -> str:
    """The user's message: MBPP's prompt when the task has tests, else the task text as is."""
    if not task.tests:
        return task.text
    return MBPP_TEMPLATE.format(text=task.text.strip(), tests="\n".join(t.strip() for t in task.tests))


def format_prompt(task: Task, style: str = "chat", render_chat: RenderChat | None = None) -> str:
    """The prompt text for `task`: `raw` is the message itself (followed by a newline), `chat` is the
    message as one user turn rendered by `render_chat`."""
    msg = task_message(task)
    if style == "raw":
        return msg + "\n"
    if style == "chat":
        if render_chat is None:
            raise InputError("chat prompt format needs the model's chat template, and this model has none",
                             "use --prompt-format raw")
        return render_chat([{"role": "user", "content": msg}])
    raise InputError(f"unknown prompt format {style!r}", f"use one of: {', '.join(STYLES)}")


def teacher_forced(task: Task, style: str = "chat", render_chat: RenderChat | None = None,
                   fence: bool | None = None) -> tuple[str, str]:
    """(prompt_text, continuation_text) with the reference solution as the continuation.

    The continuation is the reference code with \\n line ends and one trailing newline. `fence` wraps it
    in a ```python block (what chat models answer with); by default it does so for `chat` only.
    """
    if not task.code:
        raise InputError(f"task {task.id} has no reference solution for teacher forcing",
                         "use a dataset with reference code (mbpp, embedded) or --mode generate")
    prompt = format_prompt(task, style, render_chat)
    code = normalize_newlines(task.code).strip("\n").rstrip() + "\n"
    if fence if fence is not None else style == "chat":
        code = f"```python\n{code}```\n"
    return prompt, code
