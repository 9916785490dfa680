"""Workloads: MBPP and other prompt sets as `Task` records, and how they become prompts."""

from hotcold.workloads.loaders import (
    DEFAULT_SPLIT,
    EMBEDDED_SPLITS,
    MBPP_ENV,
    MBPP_SPLITS,
    Dataset,
    DatasetSpec,
    find_mbpp,
    load_dataset,
    load_embedded,
    load_jsonl_prompts,
    load_mbpp_file,
    load_txt_prompts,
    normalize_newlines,
    parse_dataset_spec,
    resolve_mbpp_path,
)
from hotcold.workloads.prompts import (
    HUMANEVAL_TEMPLATE,
    MBPP_TEMPLATE,
    format_prompt,
    pass1_message,
    task_message,
    teacher_forced,
)
from hotcold.workloads.tasks import LoadStats, PromptItem, Task, select

__all__ = [
    "DEFAULT_SPLIT", "EMBEDDED_SPLITS", "HUMANEVAL_TEMPLATE", "MBPP_ENV", "MBPP_SPLITS", "MBPP_TEMPLATE", "Dataset", "DatasetSpec",
    "LoadStats", "PromptItem", "Task", "find_mbpp", "format_prompt", "load_dataset", "load_embedded",
    "load_jsonl_prompts", "load_mbpp_file", "load_txt_prompts", "normalize_newlines", "parse_dataset_spec", "pass1_message",
    "resolve_mbpp_path", "select", "task_message", "teacher_forced",
]
