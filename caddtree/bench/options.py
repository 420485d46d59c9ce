"""What `caddtree bench` is asked to do (kept free of heavy imports: the CLI parser reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BUDGETS = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_METHODS = ("ar", "dflash", "ddtree", "caddtree", "lookup")


@dataclass
class BenchOptions:
    out: Path
    datasets: list[str] | None = None  # None: the offline sets, or every set in prompts_file
    n: int = 20  # prompts per dataset
    budgets: list[int] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    prompts_file: str | None = None
    target: str | None = None
    drafter: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    cost_model: str = "auto"
    hf_generate: bool = True
    cuda_graphs: bool = True
