"""The fitted cost model: round cost Cd(l) + Cv(n; l) per tree size, saved as JSON."""

import bisect
import hashlib
import json
import os
import pathlib
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from caddtree.cache import cache_root
from caddtree.cost.fit import CostCurve, fit_convex, fit_monotone
from caddtree.errors import CaddtreeError

FORMAT = "caddtree-cost-model"
VERSION = 10  # 2: profiles include tree size 0, the plain decoding step; 3: few-row linear dispatch on the CPU;
# 4: quick CPU profiles time every small tree size, round-robin; 5: few-row GEMMs padded to multiples of 8 rows;
# 6: 5 or more rows through oneDNN's linear on the CPU; 7: from 5 rows with weights packed once;
# 8: every row count through oneDNN with packed weights; 9: the lower quartile of the repeats, not their median;
# 10: tree attention in one masked call and the drafter in bfloat16 on the CPU
META_KEYS = ("target", "drafter", "device", "dtype")
FIELDS = ("meta", "contexts", "draft_seconds", "verify_convex", "verify_monotone", "measurements")


@dataclass
class CostModel:
    meta: dict  # what it was measured for: one string per META_KEYS entry
    contexts: list[int]  # profiled context lengths, strictly increasing
    draft_seconds: list[float]  # drafter round cost at each context length
    verify_convex: list[CostCurve]  # per context length, for the greedy budget rule
    verify_monotone: list[CostCurve]  # per context length, for the exact budget rule
    measurements: dict  # raw timings (one per size) kept for plots: sizes, verify_seconds, draft_seconds
    # (context, tree size) round-cost tables per (max_nodes, convex), so a round is one blend.
    _cost_tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        missing = [key for key in META_KEYS if key not in self.meta]
        if missing:
            raise ValueError(f"meta lacks {', '.join(missing)}")
        per_context = (self.draft_seconds, self.verify_convex, self.verify_monotone)
        if not self.contexts or any(len(values) != len(self.contexts) for values in per_context):
            raise ValueError("draft times and verify curves must be given for each profiled context length")
        if any(b <= a for a, b in zip(self.contexts, self.contexts[1:])):
            raise ValueError("context lengths must be strictly increasing")

    @classmethod
    def fit(cls, meta, contexts, sizes, verify_seconds, draft_seconds) -> "CostModel":
        """Fit both curve kinds per context; verify_seconds is (len(contexts), len(sizes)) seconds."""
        verify_seconds = np.asarray(verify_seconds, dtype=np.float64)
        if verify_seconds.shape != (len(contexts), len(sizes)):
            expected = (len(contexts), len(sizes))
            raise ValueError(f"verify_seconds has shape {verify_seconds.shape}, expected {expected}")
        return cls(
            meta=dict(meta),
            contexts=[int(context) for context in contexts],
            draft_seconds=[float(seconds) for seconds in draft_seconds],
            verify_convex=[fit_convex(sizes, row) for row in verify_seconds],
            verify_monotone=[fit_monotone(sizes, row) for row in verify_seconds],
            measurements={
                "sizes": [float(size) for size in sizes],
                "verify_seconds": verify_seconds.tolist(),
                "draft_seconds": [float(seconds) for seconds in draft_seconds],
            },
        )

    def round_costs(self, max_nodes: int, context_len: int, convex: bool, device="cpu",
                    drafted: bool = True) -> torch.Tensor:
        """(max_nodes+1,) float64 seconds of a round with n = 0..max_nodes tree nodes at context_len,
        on `device` (tables are kept there, so choosing a budget copies nothing between devices);
        without `drafted`, a round whose nodes cost no draft pass (lookups)."""
        table = self._cost_table(max_nodes, convex, torch.device(device), drafted)
        lower, upper, weight = self._context_blend(context_len)
        return torch.lerp(table[lower], table[upper], weight)

    def plain_step_seconds(self, context_len: int, convex: bool) -> float:
        """Cv(0): verifying the root alone, i.e. a decoding step without the drafter."""
        lower, upper, weight = self._context_blend(context_len)
        curves = self.verify_convex if convex else self.verify_monotone
        return float(curves[lower](0.0) * (1 - weight) + curves[upper](0.0) * weight)

    def _cost_table(self, max_nodes: int, convex: bool, device: torch.device, drafted: bool) -> torch.Tensor:
        key = (max_nodes, convex, device, drafted)
        if key not in self._cost_tables:
            curves = self.verify_convex if convex else self.verify_monotone
            sizes = np.arange(max_nodes + 1, dtype=np.float64)
            rows = [draft * drafted + curve(sizes) for draft, curve in zip(self.draft_seconds, curves)]
            self._cost_tables[key] = torch.from_numpy(np.stack(rows)).to(device)
        return self._cost_tables[key]

    def _context_blend(self, context_len: int) -> tuple[int, int, float]:
        """Indices of the two profiled contexts around context_len and the weight of the upper one."""
        upper = bisect.bisect_right(self.contexts, context_len)
        if upper == 0:
            return 0, 0, 0.0
        if upper == len(self.contexts):
            return upper - 1, upper - 1, 0.0
        lower = upper - 1
        span = self.contexts[upper] - self.contexts[lower]
        return lower, upper, (context_len - self.contexts[lower]) / span

    def save(self, path) -> None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._to_json(), indent=1, allow_nan=False)
        # Write then rename, so a crash or a concurrent reader never sees half a file.
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
                temp_file.write(text)
            os.replace(temp_name, path)
        except BaseException:
            os.unlink(temp_name)
            raise

    @classmethod
    def load(cls, path, expect_meta: dict | None = None) -> "CostModel":
        path = pathlib.Path(path)
        data = _read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CaddtreeError(f"{path} is not a caddtree cost model (no \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if version != VERSION:
            raise CaddtreeError(f"cost model {path} has version {version!r}; this caddtree reads {VERSION}")
        missing = [name for name in FIELDS if name not in data]
        if missing:
            raise CaddtreeError(f"cost model {path} lacks the field(s) {', '.join(missing)}")
        try:
            model = cls._from_json(data)
        except KeyError as error:
            raise CaddtreeError(f"cost model {path} lacks the field {error}") from None
        except (TypeError, ValueError) as error:
            raise CaddtreeError(f"cost model {path} is malformed: {error}") from None
        if expect_meta is not None:
            _check_meta(path, model.meta, expect_meta)
        return model

    def _to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "contexts": self.contexts,
            "draft_seconds": self.draft_seconds,
            "verify_convex": [_curve_to_json(curve) for curve in self.verify_convex],
            "verify_monotone": [_curve_to_json(curve) for curve in self.verify_monotone],
            "measurements": self.measurements,
        }

    @classmethod
    def _from_json(cls, data: dict) -> "CostModel":
        return cls(
            meta=dict(data["meta"]),
            contexts=[int(context) for context in data["contexts"]],
            draft_seconds=[float(seconds) for seconds in data["draft_seconds"]],
            verify_convex=[_curve_from_json(curve) for curve in data["verify_convex"]],
            verify_monotone=[_curve_from_json(curve) for curve in data["verify_monotone"]],
            measurements=dict(data["measurements"]),
        )


def cache_path(meta: dict) -> pathlib.Path:
    """Where `--cost-model auto` keeps the model for this meta: a readable prefix plus a hash of all of it."""
    # Model ids and paths are long; their last component is enough to recognise the file by eye.
    readable = "-".join(pathlib.PurePath(str(meta[key])).name for key in META_KEYS)
    prefix = re.sub(r"[^A-Za-z0-9._+-]+", "_", readable)[:80]
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "cost" / f"{prefix}-{digest}.json"


def _read_json(path: pathlib.Path):
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CaddtreeError(
            f"cost model {path} does not exist; run `caddtree profile` or pass --cost-model auto"
        ) from None
    except OSError as error:
        raise CaddtreeError(f"cannot read cost model {path}: {error.strerror}") from None
    try:
        return json.loads(raw)
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8 text
        raise CaddtreeError(f"cost model {path} is not valid JSON ({error})") from None


def _check_meta(path: pathlib.Path, found: dict, expected: dict) -> None:
    for key in META_KEYS:
        if key in expected and found[key] != expected[key]:
            raise CaddtreeError(
                f"cost model {path} was measured for {key} {found[key]!r}, not {expected[key]!r}; "
                "re-run `caddtree profile` or pass --cost-model auto"
            )


def _curve_to_json(curve: CostCurve) -> dict:
    return {"sizes": list(curve.sizes), "seconds": list(curve.seconds)}


def _curve_from_json(data: dict) -> CostCurve:
    return CostCurve(tuple(float(size) for size in data["sizes"]), tuple(float(s) for s in data["seconds"]))
