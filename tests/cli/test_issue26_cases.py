"""Each case of issue 26 built with sentinel files: the refusal is one `error:` line with a non-zero
exit, and every sentinel's sha256 is unchanged (or, where a value has a meaning, the result is right)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_output_contract import (
    assert_one_line_error,
    fingerprint,
    leftovers,
    save_tiny_model,
    write_llama2c,
    write_text,
)
from typer.testing import CliRunner

import ropekit
from gguf_fixtures import require_llama_cpp, write_llama_gguf
from ropekit import RopekitError
from ropekit.cli.main import app
from ropekit.manifest import MANIFEST, read_manifest

runner = CliRunner()
PLAN = ["plan", "--preset", "llama2-7b", "--target-length", "8192", "--method", "pi"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny26")
    return save_tiny_model(root / "model"), write_text(root / "text.txt", words=2000)


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str | Path):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def finetune_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", str(model), "--data", str(text), "--target-length", "1024", "--steps", "1",
        "--global-batch", "1", "--report-to", "none", "--method", "pi", "--out", str(out), *extra,
    ]  # fmt: skip


# ---- data loss ---------------------------------------------------------------------------------------------


def test_plan_overwrite_refuses_a_model_that_convert_wrote(tmp_path):
    ckpt, tok = write_llama2c(tmp_path / "l2c")
    model = tmp_path / "model"
    ok("convert", "llama2c", ckpt, tok, "--out", model)
    before = fingerprint(model)
    assert {"model.safetensors", "config.json", MANIFEST} <= set(before)
    assert_one_line_error(invoke(*PLAN, "--out", model, "--overwrite"), "holds a converted model ropekit wrote")
    assert fingerprint(model) == before and leftovers(tmp_path) == []


def test_overwrite_refuses_a_user_folder_with_a_copied_plan_json_or_manifest(tmp_path):
    earlier = tmp_path / "earlier"
    ok(*PLAN, "--out", earlier)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "paper.tex").write_text("\\documentclass{article}")
    (folder / "plan.json").write_bytes((earlier / "plan.json").read_bytes())  # a copied, signed marker
    before = fingerprint(folder)
    assert_one_line_error(invoke(*PLAN, "--out", folder, "--overwrite"), "earlier ropekit version")
    (folder / MANIFEST).write_bytes((earlier / MANIFEST).read_bytes())  # a copied manifest proves nothing
    before = fingerprint(folder)
    result = invoke(*PLAN, "--out", folder, "--overwrite")
    assert_one_line_error(result, f"{folder}/model.safetensors is not one of the files ropekit wrote")
    assert fingerprint(folder) == before


@pytest.mark.parametrize("command", ["plan", "extend"])
def test_overwrite_refuses_an_earlier_output_with_an_added_file(command, tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "out"
    args = PLAN if command == "plan" else ["extend", model, "--target-length", "1024", "--method", "pi"]
    ok(*args, "--out", out)
    ok(*args, "--out", out, "--overwrite")  # its own unchanged output: replaced
    (out / "NOTES.md").write_text("my notes")
    before = fingerprint(out)
    assert_one_line_error(invoke(*args, "--out", out, "--overwrite"), f"{out}/NOTES.md is not one of the files")
    assert fingerprint(out) == before and leftovers(tmp_path) == []


def test_extend_refuses_a_factors_file_inside_the_output(tiny, tmp_path):
    model, _ = tiny
    out = tmp_path / "out"
    ok("extend", model, "--target-length", "1024", "--method", "pi", "--out", out)
    (out / "factors.json").write_text(json.dumps([2.0] * 4))
    before = fingerprint(out)
    result = invoke(
        "extend", model, "--target-length", "1024", "--method", "longrope",
        "--factors-file", out / "factors.json", "--out", out, "--overwrite",
    )  # fmt: skip
    assert_one_line_error(result, f"output directory {out} contains the input {out / 'factors.json'}")
    assert fingerprint(out) == before


# ---- tracebacks that are one line now --------------------------------------------------------------------


def test_memory_bounds_and_yarn_betas_are_one_line(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "head_dim": 10**9, "max_position_embeddings": 4096}))
    cases = {
        ("--bins", "1000000000"): "bins (--bins) must be an integer in [2, 36000]",
        ("--method", "yarn", "--beta-fast", "0", "--beta-slow", "0"): "beta_fast (--beta-fast) must be a number > 0",
    }
    for extra, expected in cases.items():
        assert_one_line_error(invoke(*PLAN[:-2], *extra), expected)
    result = invoke("plan", "--model", config, "--target-length", "8192")
    assert_one_line_error(result, "head_dim must be an integer in [2, 1024]")


def test_extend_gguf_under_a_file_is_one_line(tmp_path):
    source = write_llama_gguf(tmp_path / "x.gguf")
    (tmp_path / "some_file.txt").write_text("user data")
    result = invoke(
        "extend", source, "--target-length", "2048", "--method", "pi", "--out", tmp_path / "some_file.txt" / "x.gguf"
    )
    assert_one_line_error(result, "some_file.txt is a file, so it cannot hold the output file")
    assert (tmp_path / "some_file.txt").read_text() == "user data"


def test_rope_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("user data")
    monkeypatch.setenv("ROPEKIT_CACHE", str(cache))
    assert_one_line_error(invoke("cache"), "is a file, not a directory")
    from ropekit.data.documents import tokenize_documents

    with pytest.raises(RopekitError, match="is a file, not a directory"):
        tokenize_documents([("a", "text")], tokenizer=None)  # the cache is checked before any tokenisation
    monkeypatch.setenv("ROPEKIT_CACHE", "relative/cache")
    assert_one_line_error(invoke("cache"), "must be an absolute path")
    assert cache.read_text() == "user data"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--weight-decay", "-1"), "--weight-decay must be a number ≥ 0"),
        (("--seed", "-1"), "--seed must be an integer in [0, 4294967295]"),
        (("--train-length", "0"), "--train-length must be an integer in [2, "),
        (("--max-tokens", "-1"), "--max-tokens must be an integer in [1, "),
        (("--lr", "1e6"), "--lr must be a number in (0, 1]"),
        (("--warmup-steps", "1000"), "--warmup-steps 1000 exceeds --steps 1"),
        (("--mixed-precision", "fp16"), "--mixed-precision fp16 needs a CUDA GPU"),
        (("--global-batch", "1000000", "--train-length", "64", "--pose"), "exceeds the"),
    ],
)
def test_finetune_settings_outside_their_domain_are_refused_and_write_nothing(extra, expected, tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "run"
    result = invoke(*finetune_args(model, text, out, *extra))
    assert_one_line_error(result, expected, after_work=True)
    assert not out.exists()  # a refused run writes nothing: no ropekit.json to block the corrected rerun


def test_finetune_report_to_a_missing_tracker_is_refused(tiny, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    model, text = tiny
    result = invoke(*finetune_args(model, text, tmp_path / "run", "--report-to", "wandb"))
    assert_one_line_error(result, "wandb is not installed")
    assert not (tmp_path / "run").exists()


def test_python_api_mistakes_are_one_line(tmp_path):
    from conftest import tiny_llama

    spec = ropekit.RopeSpec(head_dim=64, base=10000.0, context_length=256)
    model = tiny_llama(64)
    plan = ropekit.make_plan(ropekit.RopeSpec.from_config(model.config), 1024, "pi")
    cases = [
        (lambda: ropekit.make_plan(spec, 1024, None), "method must be a method name"),
        (lambda: ropekit.apply_plan(None, plan), "apply_plan takes a loaded transformers model"),
        (lambda: ropekit.apply_plan(model, "dprope"), "expected a Plan"),
        (lambda: ropekit.register_method(None), "register_method takes a"),
        (lambda: ropekit.make_plan(spec, 1024, "pi", bins=0), r"bins \(--bins\) must be an integer in \[2, 36000\]"),
        (lambda: ropekit.min_base_for_length(spec, 10**12), r"must be an integer in \[2, 4194304\]"),
        (lambda: ropekit.extend(str(tmp_path), str(tmp_path / "o"), target_length=1024, overwrite="no"), "overwrite must be True or False"),
    ]  # fmt: skip
    import dataclasses

    yarn_copy = dataclasses.replace(ropekit.get_method("pi"), name="yarn", aliases=())
    cases.append((lambda: ropekit.register_method(yarn_copy), "method name 'yarn' is already registered"))
    for call, expected in cases:
        with pytest.raises(RopekitError, match=expected):
            call()
    assert ropekit.get_method("yarn").function.__name__ == "yarn"  # the built-in was not replaced


# ---- silently accepted values: refused, or their meaning stated and right ---------------------------------


def test_geometry_and_method_values_without_meaning_are_refused(tmp_path):
    geometry = ["plan", "--head-dim", "64", "--original-length", "256", "--target-length", "1024"]
    cases = {
        ("--rope-theta", "1e308"): "must be a number in (1, 1e+12]",
        ("--rope-theta", "1e4", "--partial-rotary-factor", "0"): "partial_rotary_factor must be a number in (0, 1]",
        ("--rope-theta", "1e4", "--method", "yarn", "--attention-factor", "1e30"): "attention_factor (--attention-factor) must be a number in (0, 10]",
    }  # fmt: skip
    for extra, expected in cases.items():
        assert_one_line_error(invoke(*geometry, *extra, "--out", tmp_path / "o"), expected)
    assert not (tmp_path / "o").exists()
    from ropekit.cli.options import method_options

    assert "at or below L the frequencies are the original ones" in method_options()["at_length"].help  # --help's text
    spec = ropekit.RopeSpec(head_dim=64, base=10000.0, context_length=256)
    identity = ropekit.make_plan(spec, 1024, "dynamic-ntk", at_length=100)  # as transformers' dynamic below L
    assert identity.factors == (1.0,) * 32
    for config, expected in (
        ({"max_position_embeddings": 4096.5}, "max_position_embeddings must be a whole number"),
        ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 4096}}, "has no 'factor'"),
    ):  # fmt: skip
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"model_type": "llama", "head_dim": 64, **config}))
        assert_one_line_error(invoke("plan", "--model", path, "--target-length", "16384"), expected)


def test_extend_gguf_refuses_layer_types(tmp_path):
    source = write_llama_gguf(tmp_path / "x.gguf")
    result = invoke(
        "extend", source, "--target-length", "2048", "--layer-types", "sliding_attention", "--out", tmp_path / "y.gguf"
    )
    assert_one_line_error(result, "--layer-types applies to a model directory")
    assert not (tmp_path / "y.gguf").exists()


# ---- nothing left behind -----------------------------------------------------------------------------------


def terminate_during(monkeypatch, module: str, name: str) -> None:
    """Send this process SIGTERM from inside `module.name`, once the partial output exists."""
    import importlib

    target = importlib.import_module(module)
    original = getattr(target, name)

    def interrupted(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(target, name, interrupted)


def test_sigterm_during_extend_gguf_and_convert_leaves_nothing(tmp_path, monkeypatch, run_main):
    (tmp_path / "src").mkdir()
    source = write_llama_gguf(tmp_path / "src" / "x.gguf")
    out = tmp_path / "out"
    out.mkdir()
    terminate_during(monkeypatch, "ropekit.apply.gguf_record", "seal")  # the partial .gguf is complete by then
    code, _, err = run_main(
        "extend", str(source), "--target-length", "2048", "--method", "pi", "--out", str(out / "x.gguf")
    )
    assert code == 143 and "terminated (SIGTERM)" in err and list(out.iterdir()) == []
    terminate_during(monkeypatch, "ropekit.manifest", "write_manifest")  # the partial directory is complete by then
    ckpt, tok = write_llama2c(tmp_path / "l2c")
    code, _, err = run_main("convert", "llama2c", str(ckpt), str(tok), "--out", str(out / "m"))
    assert code == 143 and "nothing was written" in err and list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.parametrize("link_to", ["dangling", "empty", "earlier output"])
def test_a_symlinked_out_is_resolved(link_to, tmp_path):
    real = tmp_path / "real"
    if link_to == "empty":
        real.mkdir()
    elif link_to == "earlier output":
        ok(*PLAN, "--out", real)
    link = tmp_path / "link"
    link.symlink_to(real)
    ok(*PLAN, "--out", link, *(["--overwrite"] if link_to == "earlier output" else []))
    assert link.is_symlink() and (real / "plan.json").is_file() and leftovers(tmp_path) == []


def test_cache_command_shows_and_clears_only_ropekits_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROPEKIT_CACHE", str(cache))
    from ropekit.paths import cache_root

    (cache_root() / "tokens").mkdir()
    (cache / "tokens" / "x.npz").write_bytes(b"0" * 2000)
    shown = "".join(ok("cache").output.split())  # without spaces: a long title wraps anywhere
    assert str(cache) in shown and "2kB" in shown and "--clear" in shown
    ok("cache", "--clear")
    assert not (cache / "tokens").exists() and (cache / "CACHEDIR.TAG").is_file()
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    monkeypatch.setenv("ROPEKIT_CACHE", str(foreign))
    assert_one_line_error(invoke("cache", "--clear"), "holds files that are not ropekit's cache")
    assert (foreign / "thesis.tex").read_text() == "mine"
    earlier = tmp_path / "earlier"  # an untagged cache of an earlier ropekit: its own parts only, models/ included
    (earlier / "models").mkdir(parents=True)
    (earlier / "tokens").mkdir()
    monkeypatch.setenv("ROPEKIT_CACHE", str(earlier))
    assert "models" in "".join(ok("cache").output.split())
    assert cache_root() == earlier and (earlier / "CACHEDIR.TAG").is_file() and (earlier / "models").is_dir()


# ---- messages that tell the truth --------------------------------------------------------------------------


def test_ctrl_c_outside_a_fine_tune_gives_no_fine_tune_advice(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ropekit.apply.plan_dir.plan_report", interrupt)
    result = invoke(*PLAN, "--out", tmp_path / "o")
    assert_one_line_error(result, "interrupted before the result was complete; nothing was written", code=130)
    assert "fine-tune" not in result.stderr and not (tmp_path / "o").exists()


def test_the_comparison_skips_and_names_a_method_that_does_not_apply():
    result = ok(
        "plan", "--head-dim", "2", "--rope-theta", "10000", "--original-length", "256", "--target-length", "1024"
    )
    table = " ".join(result.output.split())
    assert "dynamic-ntk │ skipped │ dynamic NTK needs a rotary dimension > 2" in table
    assert "dprope ←" in table


def test_inspect_of_a_device_and_of_an_unreachable_hub_id(monkeypatch):
    assert_one_line_error(invoke("inspect", "/dev/zero"), "a device or other special file")
    monkeypatch.setattr("ropekit.apply.readers.hub_reachable", lambda timeout=3.0: False)
    result = invoke("inspect", "someone/not-cached-model")
    assert_one_line_error(result, "the Hugging Face hub cannot be reached")
    assert "Retrying" not in result.output


def test_inspect_next_commands_are_whole_lines(tiny):
    model, _ = tiny
    lines = ok("inspect", model).output.splitlines()
    commands = [line.strip() for line in lines if line.strip().startswith("ropekit ")]
    assert any(c.startswith(f"ropekit plan --model {model} --target-length") for c in commands), lines
    assert all("…" not in c for c in commands)


def test_help_shows_no_bool_after_flags_and_states_the_overwrite_rule():
    for command in (["plan"], ["extend"], ["finetune"], ["convert", "gguf"], ["cache"]):
        text = invoke(*command, "--help").output
        assert "<bool>" not in text, (command, [line for line in text.splitlines() if "<bool>" in line])
    words = "".join(invoke("plan", "--help").output.replace("│", "").split())
    assert "manifest(ropekit-manifest.json)mustlisteveryfileinit,unchanged" in words


# ---- the common case stays easy: rerun with --overwrite on its own unchanged output ------------------------


def test_extend_gguf_overwrite_replaces_only_its_own_unchanged_file(tmp_path):
    source = write_llama_gguf(tmp_path / "x.gguf")
    out = tmp_path / "y.gguf"
    args = ("extend", source, "--target-length", "2048", "--method", "pi", "--out", out)
    ok(*args)
    ok(*args, "--overwrite")  # its own, unchanged: replaced
    data = bytearray(out.read_bytes())
    data[-1] ^= 1  # a byte changed (an edit, or a requantised copy that kept ropekit's keys)
    out.write_bytes(bytes(data))
    before = fingerprint(tmp_path)
    assert_one_line_error(invoke(*args, "--overwrite"), "was changed after ropekit wrote it")
    user = tmp_path / "user.gguf"
    user.write_bytes(source.read_bytes())
    assert_one_line_error(invoke(*args[:-1], user, "--overwrite"), "is not a GGUF ropekit wrote")
    assert fingerprint(tmp_path) == {**before, "user.gguf": fingerprint(tmp_path)["user.gguf"]}


# ---- eval ------------------------------------------------------------------------------------------------


def eval_run(model: Path, text: Path, *extra: str | Path) -> tuple[str | Path, ...]:
    return ("eval", model, "--data", text, "--lengths", "64", "--max-tokens", "128", *extra)


def test_eval_refuses_an_evaluator_that_is_the_output(tiny, tmp_path):
    model, text = tiny
    evaluator = tmp_path / "extended"
    ok("extend", model, "--target-length", "1024", "--method", "pi", "--out", evaluator)
    before = fingerprint(evaluator)
    args = ("--tasks", "longppl", "--short-length", "32", "--evaluator", evaluator, "--out", evaluator, "--overwrite")
    assert_one_line_error(invoke(*eval_run(model, text, *args)), f"output directory {evaluator} is the input")
    assert fingerprint(evaluator) == before and leftovers(tmp_path) == []


def test_eval_refuses_a_passkey_task_file_inside_the_output(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "report"
    ok(*eval_run(model, text, "--tasks", "ppl", "--store", tmp_path / "cells.sqlite", "--out", out))
    (out / "task.txt").write_text("There is a pass key hidden in this text. Find it.")
    before = fingerprint(out)
    result = invoke(*eval_run(model, text, "--tasks", "passkey", "--passkey-task-file", out / "task.txt"), "--out", out)
    assert_one_line_error(result, f"output directory {out} contains the input {out / 'task.txt'}")
    result = invoke(
        *eval_run(model, text, "--tasks", "passkey", "--passkey-task-file", out / "task.txt"),
        "--out",
        out,
        "--overwrite",
    )
    assert_one_line_error(result, f"output directory {out} contains the input {out / 'task.txt'}")
    assert fingerprint(out) == before and leftovers(tmp_path) == []


def test_eval_names_a_missing_passkey_task_file(tiny, tmp_path):
    model, text = tiny
    missing = tmp_path / "task.txt"
    result = invoke(*eval_run(model, text, "--tasks", "passkey", "--passkey-task-file", missing))
    assert_one_line_error(result, f"the passkey task-line file {missing} does not exist")
    assert "--lengths" not in result.stderr


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--tasks", "longppl", "--longppl-threshold", "nan"), "--longppl-threshold must be a finite number, got nan"),
        (("--tasks", "passkey", "--depths", ""), "--depths needs at least one value"),
        (("--tasks", "ppl", "--lengths", ""), "--lengths needs at least one value"),
        (
            ("--tasks", "longppl", "--short-length", "4096", "--lengths", "512", "--max-tokens", "512"),
            "--short-length 4096 must be below the longest --lengths value (512)",
        ),
        (("--tasks", "ppl", "--stride", "100000"), "--stride 100000 is beyond the longest window (64 tokens)"),
        (("--tasks", "passkey", "--seed", "-1"), "--seed must be an integer in [0, 4294967295]"),
        (("--tasks", "passkey", "--depths", "0,1.5"), "each --depths value must be a number in [0, 1], got 1.5"),
        (("--tasks", "ppl", "--stride", "0"), "--stride must be an integer ≥ 1, got 0"),
    ],
    ids=["threshold nan", "no depths", "no lengths", "short ≥ length", "stride", "seed", "depth", "stride 0"],
)
def test_eval_refuses_values_outside_their_domain_and_writes_nothing(tiny, tmp_path, extra, expected):
    model, text = tiny
    store, out = tmp_path / "cells.sqlite", tmp_path / "report"
    result = invoke(*eval_run(model, text, "--store", store, "--out", out, *extra))
    assert_one_line_error(result, expected)
    assert not out.exists() and not store.exists() and leftovers(tmp_path) == []


def test_eval_refuses_a_store_inside_the_output(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "report"
    result = invoke(*eval_run(model, text, "--tasks", "ppl", "--store", out / "cells.sqlite", "--out", out))
    assert_one_line_error(result, f"--store {out / 'cells.sqlite'} is inside the output directory {out}")
    assert not out.exists()


def test_passkey_grid_refuses_an_empty_grid_in_the_api(tiny):
    from ropekit.eval.passkey import passkey_grid

    for kwargs, message in (
        ({"lengths": [], "depths": [0.5]}, "passkey_grid needs at least one of lengths"),
        ({"lengths": [64], "depths": []}, "passkey_grid needs at least one of depths"),
        ({"lengths": [64], "depths": [0.5], "seed": -1}, "seed must be an integer in [0, 4294967295]"),
        ({"lengths": [1], "depths": [0.5]}, "each of lengths must be an integer ≥ 2"),
        ({"lengths": [64], "depths": [0.5], "trials": 0}, "trials must be an integer ≥ 1"),
    ):
        with pytest.raises(RopekitError) as raised:
            passkey_grid(None, None, **kwargs)  # refused before the model or tokenizer is touched
        assert message in str(raised.value) and "\n" not in str(raised.value)


def test_eval_help_states_the_domain_of_every_ranged_task_option():
    from ropekit.eval.registry import task_options

    shown = " ".join(runner.invoke(app, ["eval", "--help"], terminal_width=500).stdout.replace("│", " ").split())
    ranged = {name: o.spec for name, o in task_options().items() if o.spec.record.domain is not None}
    assert {"stride", "depths", "seed", "trials", "short_length", "nll_bucket"} <= set(ranged)
    for spec in ranged.values():
        domain = spec.record.domain
        if domain.low is not None or domain.high is not None:
            assert f"(valid: {'each ' if spec.many else ''}{domain.describe()})" in shown, spec.flag
    assert "(valid: each a number in [0, 1])" in shown and "(valid: an integer in [0, 4294967295])" in shown


def test_eval_says_where_its_cells_are_and_ropekit_cache_clears_them(tiny, tmp_path, monkeypatch):
    model, text = tiny
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROPEKIT_CACHE", str(cache))
    result = ok(*eval_run(model, text, "--tasks", "ppl"))
    store = cache / "eval" / "cells.sqlite"
    assert store.is_file()
    note = " ".join(result.stderr.split())
    assert f"evaluation cells kept in {store} for reruns; cache: {cache} holds" in note
    assert "`ropekit cache` shows it, --clear empties it" in note
    ok("cache", "--clear")
    assert not store.exists()
    own = tmp_path / "mine.sqlite"
    note = " ".join(ok(*eval_run(model, text, "--tasks", "ppl", "--store", own)).stderr.split())
    assert f"evaluation cells kept in {own} (" in note and "your --store: delete the file to clear it" in note


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_eval_overwrite_replaces_its_own_report_on_both_backends(backend, tmp_path):
    if backend == "llama.cpp":
        require_llama_cpp()
    source = write_llama_gguf(tmp_path / "x.gguf")
    text = tmp_path / "doc.txt"
    text.write_text(" the cat sat on the mat and the dog ran after a ball." * 40)
    out = tmp_path / "report"
    args = (
        "eval", source, "--backend", backend, "--tasks", "ppl", "--lengths", "128", "--data", text,
        "--method", "pi", "--target-length", "1024", "--store", tmp_path / "cells.sqlite", "--out", out,
    )  # fmt: skip
    ok(*args)
    first = fingerprint(out)
    ok(*args, "--overwrite")  # its own unchanged report: replaced (the cells come from the store)
    record = read_manifest(out)
    assert record is not None and record["kind"] == "eval report"
    assert set(record["files"]) == set(fingerprint(out)) - {MANIFEST} and set(fingerprint(out)) == set(first)
    (out / "NOTES.md").write_text("my notes")
    before = fingerprint(out)
    assert_one_line_error(invoke(*args, "--overwrite"), f"{out}/NOTES.md is not one of the files")
    assert fingerprint(out) == before and leftovers(tmp_path) == []
