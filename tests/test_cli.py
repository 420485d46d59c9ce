"""The command line: every user mistake is exit code 2 with one `caddtree: error:` line; the
success paths print what they promise. All on tiny targets written to temporary directories."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caddtree.cli import main
from caddtree.cost.model import CostModel
from caddtree.cost.profile import device_label
from caddtree.models.drafter import DFlashDrafter
from caddtree.models.drafter_io import WEIGHTS_FILE, random_drafter, save_drafter
from tests.broken_walk import take_the_first_child_always
from tests.tiny import tiny_model, tiny_target, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"text", "new_tokens", "tokens_per_s", "ms_per_token", "tau", "rounds", "mean_budget", "method"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and with two cores shared with other work torch's
    thread pool can make each matmul a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama target directory, a fitting drafter and drafters that do not fit it."""
    root = tmp_path_factory.mktemp("models")
    target_dir = root / "target"
    tiny_model("llama", vocab_size=32, layers=4).save_pretrained(target_dir)
    tiny_tokenizer(32).save_pretrained(target_dir)
    target = tiny_target("llama", vocab_size=32, layers=4)

    drafter_dir = root / "drafter"
    good = random_drafter(target, num_layers=1, block_size=8)
    save_drafter(good, drafter_dir)

    narrow_dir = root / "narrow"  # a drafter made for a target of hidden size 32
    narrow = dataclasses.replace(good.config, hidden_size=32, head_dim=8, intermediate_size=48)
    save_drafter(DFlashDrafter(narrow), narrow_dir)

    deep_dir = root / "deep"  # a drafter made for a 12-layer target: it reads layer 6
    save_drafter(random_drafter(tiny_target("llama", layers=12), num_layers=1, block_size=8), deep_dir)
    return {"target": target_dir, "drafter": drafter_dir, "narrow": narrow_dir, "deep": deep_dir}


def generate_args(models, prompt="w3 w4 w5", *extra, drafter=None, target=None):
    return [
        "generate", prompt, "--raw", "--device", "cpu",
        "--target", str(target or models["target"]), "--drafter", str(drafter or models["drafter"]),
        *extra,
    ]


def run_cli(capsys, argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, argv, *words, only_line=False):
    """Exit code 2, no traceback, and exactly one `caddtree: error:` line (the last) naming the problem.

    Loading prints progress lines to stderr first; `only_line` demands that the error is all of
    stderr (mistakes caught before anything is loaded)."""
    code, out, err = run_cli(capsys, argv)
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip("\n").split("\n")
    errors = [line for line in lines if line.startswith("caddtree: error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    if only_line:
        assert len(lines) == 1, err
    assert out == ""
    message = errors[0]
    for word in words:
        assert word in message, message
    return message


# --- mistakes caught before loading anything ----------------------------------------------------


def test_unknown_method(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--method", "foo"),
                      "--method", "invalid choice", "'foo'", only_line=True)


def test_no_lookup_with_another_method(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--method", "ar", "--no-lookup"),
                      "--no-lookup applies to caddtree only", only_line=True)


@pytest.mark.parametrize("method, option, words", [
    ("ar", ("--budget", "4"), "method 'ar' builds none"), ("dflash", ("--budget", "4"), "method 'dflash' builds none"),
    ("ddtree", ("--uncalibrated",), "--uncalibrated applies to caddtree only"),
    ("lookup", ("--uncalibrated",), "--uncalibrated applies to caddtree only")])
def test_an_option_the_method_would_ignore_is_refused(capsys, models, method, option, words):
    assert_user_error(capsys, generate_args(models, "w3", "--method", method, *option), words, only_line=True)


def test_negative_budget(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--budget", "-1"),
                      "--budget", "must be >= 0, got -1", only_line=True)


def test_budget_not_a_number(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--budget", "many"),
                      "--budget", "not a whole number", only_line=True)


@pytest.mark.parametrize("value, words", [("0", "must be a finite number > 0"), ("soon", "not a number")])
def test_train_time_limit_must_be_a_positive_number(capsys, tmp_path, value, words):
    assert_user_error(capsys, ["train-drafter", "--out", str(tmp_path), "--max-minutes", value],
                      "--max-minutes", words, only_line=True)


@pytest.mark.parametrize("option, value, words", [
    ("--weight-decay", "-0.1", "must be a number >= 0, got -0.1"), ("--weight-decay", "nan", "got nan"),
    ("--feature-dropout", "1", "must be a number >= 0 and < 1, got 1"), ("--feature-dropout", "x", "not a number"),
])
def test_train_regularisation_options_are_checked(capsys, tmp_path, option, value, words):
    assert_user_error(capsys, ["train-drafter", "--out", str(tmp_path), option, value], option, words, only_line=True)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, models, prompt):
    assert_user_error(capsys, generate_args(models, prompt), "the prompt is empty", only_line=True)


def test_negative_temperature(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--temperature", "-1"),
                      "temperature must be >= 0, got -1", only_line=True)


def test_zero_top_p(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--top-p", "0"),
                      "top-p must be in (0, 1], got 0", only_line=True)


def test_zero_max_new_tokens(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--max-new-tokens", "0"),
                      "--max-new-tokens", "must be >= 1, got 0", only_line=True)


def test_a_seed_torch_cannot_take(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--method", "ar", "--seed", str(2**64)),
                      "--seed", "must lie in [-2**63, 2**64)", only_line=True)


def test_a_conversation_the_chat_template_refuses(capsys, models, tmp_path):
    from transformers import AutoTokenizer

    target_dir = tmp_path / "strict"
    shutil.copytree(models["target"], target_dir)
    tokenizer = AutoTokenizer.from_pretrained(models["target"])
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    tokenizer.save_pretrained(target_dir)
    args = ["generate", "w3", "--method", "ar", "--device", "cpu", "--target", str(target_dir)]
    assert_user_error(capsys, args, "chat template refuses this conversation: roles must alternate")


def test_missing_cost_model_file(capsys, models, tmp_path):
    assert_user_error(capsys, generate_args(models, "w3", "--cost-model", tmp_path / "none.json"),
                      "cost model file not found", "none.json", only_line=True)


def test_no_command(capsys):
    assert_user_error(capsys, [], "required", only_line=True)


# --- mistakes found while loading or generating -------------------------------------------------


def test_unknown_dtype(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--dtype", "float8"),
                      "unknown dtype 'float8'", "float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, models):
    argv = generate_args(models, "w3")
    argv[argv.index("--device") + 1] = "cuda"
    assert_user_error(capsys, argv, "device 'cuda'", "no CUDA")


def test_unknown_device(capsys, models):
    argv = generate_args(models, "w3")
    argv[argv.index("--device") + 1] = "tpu9"
    assert_user_error(capsys, argv, "unknown device 'tpu9'")


def test_devices_caddtree_cannot_use(capsys, models, monkeypatch):
    argv = generate_args(models, "w3")
    argv[argv.index("--device") + 1] = "mps"
    assert_user_error(capsys, argv, "caddtree runs on cpu or cuda devices, not 'mps'", only_line=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv[argv.index("--device") + 1] = "cuda:1"
    assert_user_error(capsys, argv, "device 'cuda:1' asked for, but PyTorch sees 1 CUDA device(s)", only_line=True)


def test_drafter_hidden_size_does_not_fit(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", drafter=models["narrow"]),
                      "hidden size 32", "the target 64")


def test_drafter_layer_ids_do_not_fit(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", drafter=models["deep"]),
                      "target layers [6]", "layers 0..3")


def test_missing_drafter_directory(capsys, models, tmp_path):
    assert_user_error(capsys, generate_args(models, "w3", drafter=tmp_path / "no-drafter"),
                      "drafter checkpoint directory not found", "no-drafter")


def copy_drafter(models, tmp_path):
    directory = tmp_path / "copy"
    directory.mkdir()
    for name in ("config.json", WEIGHTS_FILE):
        (directory / name).write_bytes((models["drafter"] / name).read_bytes())
    return directory


def test_corrupt_drafter_weights(capsys, models, tmp_path):
    drafter = copy_drafter(models, tmp_path)
    (drafter / WEIGHTS_FILE).write_bytes(b"these bytes are not safetensors" * 8)
    assert_user_error(capsys, generate_args(models, "w3", drafter=drafter),
                      "unreadable or corrupt", WEIGHTS_FILE)


def test_corrupt_drafter_config(capsys, models, tmp_path):
    drafter = copy_drafter(models, tmp_path)
    (drafter / "config.json").write_text('{"hidden_size": 64,')
    assert_user_error(capsys, generate_args(models, "w3", drafter=drafter), "config.json", "not valid JSON")


def test_missing_target_directory(capsys, models, tmp_path):
    assert_user_error(capsys, generate_args(models, "w3", target=tmp_path / "no-target"),
                      "no-target", "neither a model directory")


def test_target_directory_without_config(capsys, models, tmp_path):
    assert_user_error(capsys, generate_args(models, "w3", target=tmp_path), "has no config.json")


def test_cost_model_for_another_model(capsys, models, tmp_path):
    meta = {"target": "SmolLM2-135M-Instruct.Q4_1.gguf", "drafter": str(models["drafter"]),
            "device": device_label(torch.device("cpu")), "dtype": "float32"}
    path = tmp_path / "other.json"
    CostModel.fit(meta, [8, 16], [1, 2, 4], [[1e-3, 2e-3, 3e-3], [2e-3, 3e-3, 4e-3]], [1e-3, 2e-3]).save(path)
    assert_user_error(
        capsys, generate_args(models, "w3", "--method", "caddtree", "--cost-model", path),
        "other.json", "measured for target 'SmolLM2-135M-Instruct.Q4_1.gguf'", "not 'target'",
    )


def test_prompt_longer_than_context(capsys, models):
    # 300 one-token words; tiny models hold 256 positions.
    prompt = " ".join(f"w{2 + i % 8}" for i in range(300))
    assert_user_error(capsys, generate_args(models, prompt, "--method", "ar"),
                      "the prompt has 300 tokens", "context holds 256")


def test_subprocess_user_error_is_one_line_without_traceback(models):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "caddtree", *generate_args(models, "w3", "--budget", "-1")]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("caddtree: error: ") and "must be >= 0, got -1" in lines[0]


def test_subprocess_load_error_ends_in_one_error_line(models, tmp_path):
    """A mistake found after loading started: the progress line, then the one error line."""
    drafter = copy_drafter(models, tmp_path)
    (drafter / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "caddtree", *generate_args(models, "w3", "--method", "ar", drafter=drafter)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("caddtree: error: ")] == lines[-1:], result.stderr
    assert "unreadable or corrupt" in lines[-1]
    assert all(line.startswith("loading target ") for line in lines[:-1]), result.stderr


# --- success paths -------------------------------------------------------------------------------


def generate_json(capsys, models, *extra):
    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--max-new-tokens", "8", "--json", *extra))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    summary = json.loads(lines[0])
    assert SUMMARY_KEYS <= summary.keys()
    assert 1 <= summary["new_tokens"] <= 8
    return summary


@pytest.fixture(scope="module")
def ar_text(models):
    """Text of the autoregressive reference run (computed once for the comparisons below)."""
    from caddtree.api import load

    result = load(str(models["target"]), str(models["drafter"]), "cpu").generate(
        "w3 w4 w5", method="ar", max_new_tokens=8, raw=True
    )
    return result.text


def test_generate_ar_json(capsys, models, ar_text):
    summary = generate_json(capsys, models, "--method", "ar")
    assert summary["method"] == "ar"
    assert summary["text"] == ar_text and ar_text.strip()
    assert summary["tau"] == pytest.approx(1.0)
    assert summary["mean_budget"] == 0


@pytest.mark.parametrize("budget", [8, 64])
def test_generate_ddtree_json_is_lossless(capsys, models, ar_text, budget):
    summary = generate_json(capsys, models, "--method", "ddtree", "--budget", str(budget))
    assert summary["method"] == "ddtree"
    assert summary["text"] == ar_text
    assert 0 < summary["mean_budget"] <= budget  # the last rounds' trees shrink to the tokens still wanted
    if budget == 64:
        # The (seeded) random drafter gets a token accepted here, so the equality above also
        # covers emitting accepted tree tokens, not only the target's own token per round.
        assert summary["tau"] > 1


def test_generate_caddtree_auto_cost_model(capsys, models, ar_text, tmp_path, monkeypatch):
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path))
    summary = generate_json(capsys, models, "--method", "caddtree", "--cost-model", "auto")
    assert summary["method"] == "caddtree"
    assert summary["text"] == ar_text
    written = list((tmp_path / "cost").glob("*.json"))
    assert len(written) == 1
    model = CostModel.load(written[0])
    assert model.meta["target"] == "target" and model.meta["drafter"] == str(models["drafter"])


@pytest.mark.parametrize("method_args", [["--method", "lookup"], ["--method", "caddtree", "--no-lookup"]])
def test_generate_with_and_without_lookups(capsys, models, ar_text, tmp_path, monkeypatch, method_args):
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path))
    summary = generate_json(capsys, models, *method_args)
    assert summary["method"] == method_args[1]
    assert summary["text"] == ar_text
    if method_args[1] == "lookup":
        assert summary["drafted_share"] == 0


def test_generate_streams_text_and_stats(capsys, models, ar_text):
    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--method", "ar", "--max-new-tokens", "8"))
    assert code == 0, err
    assert out.startswith(ar_text)
    stats = out.strip().splitlines()[-1]
    assert stats.startswith("[ar] ") and "tokens/s" in stats and "tau" in stats


def test_profile_writes_a_loadable_cost_model(capsys, models, tmp_path):
    out_path = tmp_path / "cm.json"
    code, out, err = run_cli(capsys, [
        "profile", "--target", models["target"], "--drafter", models["drafter"], "--device", "cpu",
        "--sizes", "1,2,4", "--contexts", "8,16", "--repeats", "1", "--out", out_path,
    ])
    assert code == 0, err
    model = CostModel.load(out_path)
    assert model.contexts == [8, 16]
    assert model.measurements["sizes"] == [1.0, 2.0, 4.0]
    assert model.meta["target"] == "target"
    lines = out.splitlines()
    assert lines[0].startswith("verify ms by tree size")
    assert lines[1].split()[-3:] == ["1", "2", "4"]
    assert lines[2].split()[0] == "8" and lines[3].split()[0] == "16"
    assert lines[-4].startswith("draft ms: l=8:")
    assert lines[-3].startswith("Cv at l=8: ") and lines[-2].startswith("Cv at l=16: ")
    assert lines[-1] == f"saved {out_path} and the plot {out_path.with_suffix('.png')}"
    assert out_path.with_suffix(".png").stat().st_size > 0


def test_profile_of_a_random_architecture(capsys, models, tmp_path):
    config = tmp_path / "config.json"
    tiny_model("qwen3", vocab_size=40, layers=3).config.to_json_file(config)
    code, out, err = run_cli(capsys, [
        "profile", "--target", f"random:{config}", "--drafter", "random:2", "--device", "cpu",
        "--sizes", "0,2,4", "--contexts", "8", "--repeats", "1", "--out", tmp_path / "cm.json",
    ])
    assert code == 0, err
    model = CostModel.load(tmp_path / "cm.json")
    assert model.meta["target"] == f"random:{config}" and model.meta["drafter"] == "random:2"
    assert "untrained" in err


def test_a_random_architecture_cannot_generate(capsys, tmp_path):
    config = tmp_path / "config.json"
    tiny_model("llama", vocab_size=32, layers=2).config.to_json_file(config)
    assert_user_error(capsys, ["generate", "hello", "--device", "cpu", "--target", f"random:{config}"],
                      "randomly initialised", "profile")


@pytest.mark.parametrize("spec, words", [
    ("random:qwen9-1t", ("unknown architecture 'qwen9-1t'", "random:qwen3-4b")),
    ("random:{tmp}/broken.json", ("not valid JSON",)),
    ("random:{tmp}/no_type.json", ('no "model_type"',)),
])
def test_random_architecture_mistakes(capsys, tmp_path, spec, words):
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "no_type.json").write_text('{"hidden_size": 8}')
    assert_user_error(capsys, ["profile", "--device", "cpu", "--target", spec.format(tmp=tmp_path)], *words)


@pytest.mark.parametrize("spec", ["random:0", "random:x"])
def test_random_drafter_layer_count_must_be_positive(capsys, models, spec):
    assert_user_error(capsys, generate_args(models, drafter=spec), "random:N")


# --- train-drafter on records from files ----------------------------------------------------------


def test_train_drafter_rejects_a_malformed_data_file(capsys, models, tmp_path):
    data = tmp_path / "records.jsonl"
    data.write_text('{"prompt_ids": [3, 4], "response_ids": [5, 6]}\n{"prompt_ids": [3], "response_ids": [99]}\n')
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path / "out", "--data", data, "--eval-prompts", "0",
                               "--target", models["target"], "--device", "cpu"],
                      f"{data} line 2", "response_ids must be a non-empty list of token ids in [0, 32)")


def test_train_drafter_takes_held_out_records_from_the_first_file(capsys, models, tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text('{"prompt_ids": [3, 4], "response_ids": [5, 6]}\n' * 3)
    second.write_text('{"prompt_ids": [7], "response_ids": [8, 9]}\n' * 10)
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path / "out", "--data", first, second, "--eval-prompts", "0",
                               "--heldout-records", "3", "--target", models["target"], "--device", "cpu"],
                      "--heldout-records 3 must be fewer than the 3 records of the first --data file", str(first))


def test_train_drafter_names_a_missing_data_file(capsys, tmp_path):
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path, "--data", tmp_path / "nowhere.jsonl.gz"],
                      "data file not found", "nowhere.jsonl.gz", only_line=True)


def test_train_drafter_refuses_to_reshape_a_checkpoint(capsys, models, tmp_path):
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path, "--init-from", models["drafter"], "--layers", "2",
                               "--draft-vocab", "16"],
                      "--draft-vocab cannot change the architecture of --init-from", only_line=True)


def test_train_drafter_on_records_writes_a_drafter_with_a_draft_vocabulary(capsys, models, tmp_path):
    generator = torch.Generator().manual_seed(0)
    lines = [json.dumps({"prompt_ids": torch.randint(2, 28, (4,), generator=generator).tolist(),
                         "response_ids": torch.randint(2, 20, (12,), generator=generator).tolist()}) for _ in range(12)]
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, [
        "train-drafter", "--out", out, "--data", data, "--eval-prompts", "0", "--heldout-records", "2",
        "--draft-vocab", "8", "--block-size", "4", "--steps", "6", "--eval-every", "3", "--anchors", "4",
        "--feature-layers", "0,3", "--target", models["target"], "--device", "cpu", "--mask-token-id", "30",
    ])
    assert code == 0, err
    assert "read 12 records, 144 answer tokens" in err and f"saved drafter to {out}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["dflash_config"] == {"target_layer_ids": [0, 3], "mask_token_id": 30, "draft_vocab_size": 8}
    history = json.loads((out / "history.json").read_text())
    assert history["evaluations"] == [3, 6] and history["training_records"] == 10


def test_train_drafter_leaves_out_records_of_held_out_prompts(capsys, models, tmp_path):
    from caddtree.models.target import encode_prompt, load_target

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w3 w4 w5"}) + "\n")
    held_out_ids = encode_prompt(load_target(str(models["target"])), "w3 w4 w5").tolist()
    records = [{"prompt_ids": held_out_ids, "response_ids": [5, 6, 7]}]
    records += [{"prompt_ids": [2, 3 + n], "response_ids": [8, 9, 10, 11]} for n in range(6)]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, [
        "train-drafter", "--out", out, "--data", data, "--prompts", prompts, "--eval-prompts", "1",
        "--eval-tokens", "2", "--block-size", "4", "--steps", "2", "--anchors", "2", "--target", models["target"],
        "--device", "cpu", "--mask-token-id", "30"])
    assert code == 0, err
    assert "left out 1 record(s) whose prompt is one of the --eval-prompts" in err
    assert json.loads((out / "history.json").read_text())["training_records"] == 6


def test_train_drafter_reads_its_features_back_from_the_cache(capsys, models, tmp_path):
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": [2, 3 + n], "response_ids": [8, 9, 10, 11]}) + "\n"
                            for n in range(6)))
    argv = ["train-drafter", "--data", data, "--eval-prompts", "0", "--block-size", "4", "--steps", "2",
            "--anchors", "2", "--target", models["target"], "--device", "cpu", "--mask-token-id", "30",
            "--feature-cache", tmp_path / "features"]
    outputs = []
    for run in ("first", "second"):
        code, stdout, err = run_cli(capsys, [argv[0], "--out", tmp_path / run, *argv[1:]])
        assert code == 0, err
        outputs.append(stdout + err)
    assert "read the target's features of 6 records" not in outputs[0]
    assert "read the target's features of 6 records" in outputs[1]
    assert len(list((tmp_path / "features").glob("features-*.safetensors"))) == 1


def test_train_drafter_refuses_a_feature_cache_that_is_a_file(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path / "out", "--feature-cache", taken],
                      f"--feature-cache {taken} is not a directory that can be written", only_line=True)


def test_output_paths_are_refused_before_the_long_work(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    assert_user_error(capsys, ["train-drafter", "--out", taken, "--data", taken],
                      f"--out {taken} is not a directory that can be written", only_line=True)
    assert_user_error(capsys, ["bench", "--out", taken], f"--out {taken} is not a directory that can be written",
                      only_line=True)
    assert_user_error(capsys, ["profile", "--out", tmp_path], f"--out {tmp_path} is a directory", only_line=True)
    assert_user_error(capsys, ["profile", "--out", taken / "model.json"], "--out's folder", only_line=True)


def test_compare_ar_reports_a_greedy_mismatch_as_an_error(capsys, models, monkeypatch):
    """A broken acceptance walk (the first child is always taken) must not pass as a speed-up."""
    take_the_first_child_always(monkeypatch)
    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--method", "dflash", "--compare-ar",
                                                   "--max-new-tokens", "12"))
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("caddtree: error: greedy dflash parts from ar at new token") and "bug" in last
    assert "OUTPUTS DIFFER" in out and "as sampling may" not in out  # the printed comparison says so too


def test_compare_ar_explains_a_parting_at_a_near_tie_without_failing(capsys, models, monkeypatch):
    """Where the two tokens' logits lie within the dtype's rounding (made wide here), a parting is
    reported as a near-tie, not as a bug."""
    from caddtree.decode import parting

    take_the_first_child_always(monkeypatch)
    monkeypatch.setitem(parting.ROUNDING, torch.float32, 1e9)
    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--method", "dflash", "--compare-ar",
                                                   "--max-new-tokens", "12"))
    assert code == 0, err
    assert "(outputs part at a near-tie that rounding decides)" in out and "OUTPUTS DIFFER" not in out
    assert "note: greedy dflash parts from ar at new token" in err and "not a bug" in err


def test_compare_ar_on_an_exact_method_says_identical(capsys, models):
    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--method", "ddtree", "--budget", "6",
                                                   "--compare-ar", "--max-new-tokens", "12"))
    assert code == 0, err
    assert "speed-up of ddtree over ar" in out and "(identical output)" in out


def test_compare_ar_with_repeats_reports_the_median_of_interleaved_pairs(capsys, models, monkeypatch):
    """Every pair is a fresh decoding of each (the order method, ar, method, ar, ...); the speed-up
    printed and returned is the median pair's, and the statistics lines are that pair's."""
    import caddtree.api

    methods, real_generate = [], caddtree.api.Pair.generate

    def recording_generate(self, prompt, method="caddtree", **kwargs):
        methods.append(method)
        return real_generate(self, prompt, method=method, **kwargs)

    monkeypatch.setattr(caddtree.api.Pair, "generate", recording_generate)
    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--method", "dflash", "--compare-ar",
                                                   "--repeats", "3", "--max-new-tokens", "8", "--json"))
    assert code == 0, err
    assert methods == ["dflash", "ar"] * 3
    summary = json.loads(out)
    speedups = summary["speedups_over_ar"]
    assert len(speedups) == 3 and summary["speedup_over_ar"] == sorted(speedups)[1]
    assert summary["tokens_per_s"] / summary["ar_tokens_per_s"] == pytest.approx(summary["speedup_over_ar"])

    code, out, err = run_cli(capsys, generate_args(models, "w3 w4 w5", "--method", "dflash", "--compare-ar",
                                                   "--repeats", "2", "--max-new-tokens", "8"))
    assert code == 0, err
    assert "the median of 2 interleaved pairs (" in out and "(identical output)" in out


def test_repeats_without_compare_ar_is_a_user_error(capsys, models):
    assert_user_error(capsys, generate_args(models, "w3", "--repeats", "3"), "--repeats", "--compare-ar",
                      only_line=True)


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10), "deserializing header"),
    (lambda d: _truncate(d / "model.safetensors", 5000), "deserializing header"),
    (lambda d: _truncate(d / "config.json", 40), "not a valid JSON"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}'), "hidden_size"),
    (lambda d: _truncate(d / "tokenizer.json", 40), "could not load target"),
    (lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe garbage"), "could not load target"),
])
def test_a_damaged_target_directory_is_one_line(capsys, models, tmp_path, damage, words):
    import shutil

    target = tmp_path / "damaged"
    shutil.copytree(models["target"], target)
    damage(target)
    assert_user_error(capsys, generate_args(models, "w3", target=target), "could not load target", words)


def test_train_drafter_data_only_answers_new_prompts_and_stops(capsys, models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(3, 9)))
    out = tmp_path / "out"
    argv = ["train-drafter", "--out", out, "--data-only", "--prompts", prompts, "--num-prompts", "3",
            "--eval-prompts", "1", "--max-new-tokens", "5", "--target", models["target"], "--device", "cpu"]
    code, stdout, err = run_cli(capsys, argv)
    assert code == 0, err
    assert f"{out / 'data.jsonl'} holds 3 records" in stdout and not (out / "config.json").exists()
    first = (out / "data.jsonl").read_text()
    code, stdout, _ = run_cli(capsys, [*argv[:7], "5", *argv[8:]])  # two more prompts: the file grows, resumed
    assert code == 0 and "holds 5 records" in stdout and (out / "data.jsonl").read_text().startswith(first)


def test_train_drafter_data_only_answers_conversations(capsys, models, tmp_path):
    """A "messages" line is a conversation: the record's prompt is all of it, as `encode_prompt` gives it."""
    from caddtree.models.target import encode_prompt, load_target

    conversations = [[{"role": "user", "content": f"w{i} w4"}, {"role": "assistant", "content": "w5 w6"},
                      {"role": "user", "content": "w7"}] for i in (3, 8)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w9 w10"}) + "\n"
                       + "".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, [
        "train-drafter", "--out", out, "--data-only", "--prompts", prompts, "--num-prompts", "2",
        "--eval-prompts", "1", "--max-new-tokens", "3", "--target", models["target"], "--device", "cpu"])
    assert code == 0, err
    target = load_target(str(models["target"]))
    expected = sorted(encode_prompt(target, c).tolist() for c in conversations)
    records = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert sorted(record["prompt_ids"] for record in records) == expected
    assert all(len(ids) > len(encode_prompt(target, "w3 w4")) + 2 for ids in expected)


@pytest.mark.parametrize("line, words", [
    ("not json", ["line 2"]),
    (json.dumps({"text": "w3"}), ["line 2", "found neither"]),
    (json.dumps({"messages": []}), ["line 2", "found neither"]),
    (json.dumps({"messages": [{"role": "bot", "content": "w3"}]}), ["line 2", "role of system, user, assistant"]),
    (json.dumps({"messages": [{"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4"}]}),
     ["line 2", "the last message is not the user's"]),
])
def test_train_drafter_rejects_a_malformed_prompt_file(capsys, tmp_path, line, words):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "w3"}) + "\n" + line + "\n")
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path / "out", "--prompts", prompts, "--device", "cpu"],
                      f"prompt file {prompts}", *words, only_line=True)


def test_train_drafter_data_only_conflicts_with_data(capsys, tmp_path):
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path, "--data-only", "--data", tmp_path / "x.jsonl"],
                      "--data-only generates data; it cannot be combined with --data", only_line=True)


def test_train_drafter_temperature_conflicts_with_data(capsys, tmp_path):
    assert_user_error(capsys, ["train-drafter", "--out", tmp_path, "--temperature", "0.7", "--data", tmp_path / "x.jsonl"],
                      "--temperature sets how answers are generated; it cannot be combined with --data", only_line=True)
