"""The output contract (ropekit.output): no command removes or replaces a path it did not
create in that run. Bad output paths give one `error:` line, exit 2, and write nothing; faults
(an exception, Ctrl-C, a concurrent run) lose nothing.

Models here are tiny random Llamas with a character tokenizer, saved to tmp_path, so the whole
file runs without the shared assets.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_llama, write_llama2c  # noqa: F401  (write_llama2c: imported from here by other tests)
from ropekit import RopekitError
from ropekit.cli.main import app
from ropekit.manifest import write_manifest
from ropekit.output import atomic_directory, is_ropekit_output, prepare_output, remove_replaced

runner = CliRunner()
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "it",
    "ran",
    "to",
    "the",
    "big",
    "red",
    "house",
    "where",
    "a",
    "dog",
    "lived",
]


def char_tokenizer():
    """A character-level fast tokenizer: ids 0-2 are <unk>, <s>, </s>, then printable ASCII."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(path: Path, *, nan: bool = False) -> Path:
    model = tiny_llama(128)
    if nan:
        import torch

        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_text(path: Path, words: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(WORDS, size=words)))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(root / "model"), write_text(root / "text.txt")


def fingerprint(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: equal fingerprints mean nothing was touched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings a run would leave behind."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name or "probe" in p.name]


def assert_one_line_error(result, expected: str, code: int = 2, *, after_work: bool = False):
    """Exit `code` and one `error:` line naming `expected`; nothing else unless the work had
    started (`after_work`: progress bars may precede the error line, never a traceback)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    if after_work:
        lines = [line for line in lines if line.startswith("error:") or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def eval_args(model, text, out, *extra):
    return ["eval", str(model), "--data", str(text), "--lengths", "32", "--max-tokens", "64", "--out", str(out), *extra]


# ---- the data-loss bug: `ropekit eval M --out M` deleted M ------------------------------------------


def test_eval_out_equal_to_the_model_is_refused_and_the_model_kept(tiny, tmp_path):
    model, text = tiny
    before = fingerprint(model)
    assert_one_line_error(runner.invoke(app, eval_args(model, text, model)), "is the input")
    assert fingerprint(model) == before and len(before) >= 4  # weights, config, tokenizer
    inside = model / "report"
    assert_one_line_error(runner.invoke(app, eval_args(model, text, inside)), "is inside the input")
    assert not inside.exists()
    assert_one_line_error(runner.invoke(app, eval_args(model, text, text.parent)), "contains the input")
    assert fingerprint(model) == before


def test_eval_refuses_a_folder_of_user_files_even_with_overwrite(tiny, tmp_path):
    model, text = tiny
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    assert_one_line_error(runner.invoke(app, eval_args(model, text, notes)), "not empty")
    assert_one_line_error(
        runner.invoke(app, eval_args(model, text, notes, "--overwrite")), "not a directory ropekit wrote"
    )
    assert fingerprint(notes) == {"todo.txt": hashlib.sha256(b"my notes").hexdigest()}
    assert leftovers(tmp_path) == []


def test_out_dot_is_refused(tiny, tmp_path, monkeypatch):
    model, text = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for out in (".", str(tmp_path)):
        assert_one_line_error(runner.invoke(app, eval_args(model, text, out, "--overwrite")), "working directory")
    assert (tmp_path / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_overwrite_replaces_only_an_earlier_ropekit_report(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "report"
    assert runner.invoke(app, eval_args(model, text, out)).exit_code == 0
    first = json.loads((out / "results.json").read_text())
    assert first["written_by"] == "ropekit" and is_ropekit_output(out)
    assert_one_line_error(runner.invoke(app, eval_args(model, text, out)), "--overwrite")
    result = runner.invoke(app, eval_args(model, text, out, "--lengths", "16", "--overwrite"))
    assert result.exit_code == 0, result.output
    second = json.loads((out / "results.json").read_text())
    assert set(second["methods"]["as-saved"]["ppl"]) == {"16"} and leftovers(tmp_path) == []


def test_a_fault_during_the_work_keeps_the_earlier_report(tiny, tmp_path, monkeypatch):
    model, text = tiny
    out = tmp_path / "report"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"written_by": "ropekit", "ropekit_version": "0"}))
    (out / "report.md").write_text("earlier report")
    write_manifest(out, "eval report")
    before = fingerprint(out)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ropekit.eval.tasks.ppl.perplexity", crash)
    result = runner.invoke(app, eval_args(model, text, out, "--overwrite", "--fresh"))  # measured, not read
    assert_one_line_error(result, "interrupted", code=130, after_work=True)
    assert fingerprint(out) == before and leftovers(tmp_path) == []


# ---- nothing in the working directory unless asked: files only where --out says ------------------------


@pytest.mark.slow
def test_without_out_plan_and_eval_write_nothing_and_the_others_ask_for_it(tiny, tmp_path, monkeypatch):
    model, text = tiny
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path / "cache"))
    plan = runner.invoke(app, ["plan", "--preset", "llama2-7b", "--target-length", "8192", "--method", "pi"])
    assert plan.exit_code == 0 and "add --out DIR" in plan.stdout, plan.output
    evaluated = runner.invoke(app, [a for a in eval_args(model, text, "-") if a not in ("--out", "-")])
    assert evaluated.exit_code == 0 and "written to" not in evaluated.stdout, evaluated.output
    assert list(cwd.iterdir()) == []
    for command in ("analyze", "convert", "extend", "finetune", "tune"):
        args = command_args(command, tiny, tmp_path, Path("unused"))
        at = args.index("--out")
        result = runner.invoke(app, args[:at] + args[at + 2 :])  # main() makes this one `error:` line
        assert result.exit_code == 2 and "Missing option '--out'" in result.output, (command, result.output)
    assert list(cwd.iterdir()) == []


# ---- output paths that cannot work: one line, before any work, for every command ---------------------


def command_args(name: str, tiny, tmp_path: Path, out: Path) -> list[str]:
    model, text = tiny
    ckpt, tok = write_llama2c(tmp_path / "l2c")
    return {
        "plan": ["plan", "--preset", "llama2-7b", "--target-length", "8192", "--out", str(out)],
        "analyze": [
            "analyze",
            "--preset",
            "llama2-7b",
            "--target-length",
            "8192",
            "--methods",
            "pi",
            "--out",
            str(out),
        ],
        "convert": ["convert", "llama2c", str(ckpt), str(tok), "--out", str(out)],
        "extend": ["extend", str(model), "--target-length", "1024", "--method", "pi", "--out", str(out)],
        "eval": eval_args(model, text, out),
        "tune": ["tune", str(model), "--target-length", "1024", "--data", str(text), "--held-out", str(text)]
        + ["--out", str(out)],
        "finetune": [
            "finetune",
            str(model),
            "--data",
            str(text),
            "--target-length",
            "1024",
            "--steps",
            "1",
            "--global-batch",
            "1",
            "--report-to",
            "none",
            "--out",
            str(out),
        ],
    }[name]


COMMANDS = ("plan", "analyze", "convert", "extend", "eval", "finetune", "tune")


def no_work(monkeypatch):
    """Fail the test if a command starts its long work (loading a model) before checking --out."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    import importlib

    targets = (
        ("ropekit.apply.extend", "load_model"),
        ("ropekit.apply.extend", "load_tokenizer"),  # the eval backends read it from there
        ("ropekit.train.loop", "load_tokenizer"),
        ("ropekit.apply.llama2c", "read_checkpoint"),
        ("ropekit.plan.registry", "compute_scaling"),
    )
    modules = [importlib.import_module(module) for module, _ in targets]  # all imported before any is patched
    for module, (_, name) in zip(modules, targets):  # (a module imported later would keep the patched name)
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_output_paths_are_one_line_before_any_work(command, tiny, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    no_work(monkeypatch)
    cases = {a_file: "existing file", a_file / "sub": "is a file"}
    for out, expected in cases.items():
        assert_one_line_error(runner.invoke(app, command_args(command, tiny, tmp_path, out)), expected)
    assert a_file.read_text() == "user data"
    locked = tmp_path / "immutable"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs)")
    try:
        for out in (locked, locked / "sub"):
            assert_one_line_error(runner.invoke(app, command_args(command, tiny, tmp_path, out)), "not writable")
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_read_only_place_is_refused_before_work(tmp_path, monkeypatch):
    """A read-only mount: the probe directory cannot be created (EROFS)."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(RopekitError, match="not writable .Read-only file system"):
        prepare_output(tmp_path / "out", kind="plan")
    assert list(tmp_path.iterdir()) == []


def test_finetune_refuses_the_model_directory_with_the_right_reason(tiny, tmp_path):
    model, text = tiny
    before = fingerprint(model)
    result = runner.invoke(app, command_args("finetune", tiny, tmp_path, model))
    assert_one_line_error(result, "is the input")
    assert "already holds a run" not in result.stderr and fingerprint(model) == before


# ---- atomic commit: concurrent runs, permissions ------------------------------------------------------


def test_a_target_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    slow = prepare_output(out, kind="plan")  # run A checks first ...
    with atomic_directory(prepare_output(out, kind="plan")) as tmp:  # ... run B finishes first
        (tmp / "who").write_text("B")
    with (
        pytest.raises(RopekitError, match="changed while this run was writing") as info,
        atomic_directory(slow) as tmp,
    ):
        (tmp / "who").write_text("A")
    assert (out / "who").read_text() == "B"
    assert (tmp_path / "out-2" / "who").read_text() == "A" and "out-2" in str(info.value)
    # with --overwrite too: A may replace the output it checked, not the one B wrote since
    checked = prepare_output(out, kind="plan", overwrite=True)
    with atomic_directory(prepare_output(out, kind="plan", overwrite=True)) as tmp:
        (tmp / "who").write_text("C")
    with pytest.raises(RopekitError, match="changed while"), atomic_directory(checked) as tmp:
        (tmp / "who").write_text("D")
    assert (out / "who").read_text() == "C" and (tmp_path / "out-3" / "who").read_text() == "D"
    assert leftovers(tmp_path) == []


def test_a_failing_body_leaves_nothing_not_even_new_parents(tmp_path):
    with (
        pytest.raises(ZeroDivisionError),
        atomic_directory(prepare_output(tmp_path / "a" / "b" / "out", kind="plan")) as tmp,
    ):
        (tmp / "half.txt").write_text("partial")
        raise ZeroDivisionError("the body fails half-way")
    assert list(tmp_path.iterdir()) == []


def test_outputs_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt, tok = write_llama2c(tmp_path / "l2c")
        result = runner.invoke(app, ["convert", "llama2c", str(ckpt), str(tok), "--out", str(tmp_path / "m")])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    out = tmp_path / "m"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert is_ropekit_output(out)


@pytest.mark.slow
def test_every_command_signs_its_output_so_overwrite_can_replace_it(tiny, tmp_path):
    for command in ("plan", "analyze", "convert", "extend"):
        out = tmp_path / command
        assert runner.invoke(app, command_args(command, tiny, tmp_path, out)).exit_code == 0
        assert is_ropekit_output(out), command
        assert_one_line_error(runner.invoke(app, command_args(command, tiny, tmp_path, out)), "not empty")
        result = runner.invoke(app, command_args(command, tiny, tmp_path, out) + ["--overwrite"])
        assert result.exit_code == 0, (command, result.output)


def signed_run(path: Path, who: str) -> Path:
    path.mkdir()
    (path / "ropekit.json").write_text(json.dumps({"written_by": "ropekit", "who": who}))
    write_manifest(path, "fine-tune run")
    return path


def test_in_place_overwrite_removes_only_the_run_it_checked(tmp_path):
    out = signed_run(tmp_path / "run", "old")
    remove_replaced(prepare_output(out, kind="fine-tune run", overwrite=True, in_place=True))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # the checked run is swapped for another (another run?) before the removal: that one stays
    signed_run(out, "checked")
    target = prepare_output(out, kind="fine-tune run", overwrite=True, in_place=True)
    out.rename(tmp_path / "elsewhere")
    signed_run(out, "newer")
    with pytest.raises(RopekitError, match="changed since it was checked"):
        remove_replaced(target)
    assert json.loads((out / "ropekit.json").read_text())["who"] == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "run"]  # nothing left aside
