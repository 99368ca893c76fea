"""Shared test helpers: where the shared assets live, and how a missing one is handled.

Outside CI a test that needs ../shared/assets skips with a clear message; under CI=true a
missing asset fails the run (CI always has them, so a skip would hide a broken path).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = Path(os.environ.get("ROPEKIT_SHARED", REPO.parent / "shared")) / "assets"


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Point ropekit's user cache (tokenisation, GGUF conversions) at a folder of this test session."""
    previous = os.environ.get("ROPEKIT_CACHE")
    os.environ["ROPEKIT_CACHE"] = str(tmp_path_factory.mktemp("ropekit-cache"))
    yield
    if previous is None:
        os.environ.pop("ROPEKIT_CACHE", None)
    else:
        os.environ["ROPEKIT_CACHE"] = previous


@pytest.fixture
def run_main(capsys, monkeypatch):
    """Call the `ropekit` entry point (`ropekit.cli.main.main`, usage errors included) in this process:
    returns (exit code, stdout, stderr). tests/cli/test_cli.py keeps one subprocess smoke test."""
    import sys

    from ropekit.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["ropekit", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        return int(exit_info.value.code or 0), captured.out, captured.err

    return run


def fast_subset(values, fast) -> list:
    """Parametrize over `values`, marking every value not in `fast` slow: the fast loop
    (`-m "not slow"`) keeps a representative case, the full suite runs them all."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def require_asset(relative: str) -> Path:
    path = SHARED_ASSETS / relative
    if not path.exists():
        message = f"shared asset {path} is missing (expected ../shared/assets beside the repository)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def tiny_llama(vocab_size: int, *, seed: int = 0):
    """A small random LlamaForCausalLM (2 layers, hidden 64) for protocol tests."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval()


def optional_asset(relative: str) -> Path | None:
    """The shared asset, or None when it is missing (tests then use a stand-in they build).

    Under CI=true a missing asset still fails: CI always has them.
    """
    path = SHARED_ASSETS / relative
    if path.exists():
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared asset {path} is missing (expected ../shared/assets beside the repository)")
    return None


_NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue"]
_THINGS = ["ball", "cat", "dog", "tree", "boat", "cake", "bird", "box", "hat", "kite"]
_ADJECTIVES = ["big", "red", "small", "happy", "old", "green", "soft", "shiny"]
_VERBS = ["saw", "found", "liked", "wanted", "made", "lost", "had", "gave"]


def generated_stories(paragraphs: int = 60, seed: int = 0) -> str:
    """Simple children's-story text (names, things, numbers), a stand-in for the TinyStories sample."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(4, 8)):
            name, other = rng.sample(_NAMES, 2)
            thing, adjective, verb = rng.choice(_THINGS), rng.choice(_ADJECTIVES), rng.choice(_VERBS)
            sentences.append(
                rng.choice(
                    [
                        f"{name} {verb} a {adjective} {thing}.",
                        f"Once upon a time, {name} and {other} played with the {thing}.",
                        f'"Look at my {thing}!" said {name}.',
                        f"{name} had {rng.randint(2, 999)} {thing}s and {other} was {adjective}.",
                        f"The {thing} was {adjective}, and {other} was very happy.",
                    ]
                )
            )
        out.append(" ".join(sentences))
    return "\n\n".join(out)


def trained_tokenizer(text: str, vocab_size: int = 512):
    """A real byte-level BPE tokenizer trained on `text`: <unk>, <s>, </s> are ids 0-2, a leading
    <s> is added, digits are single tokens, any text encodes, and decode inverts encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(text.split("\n\n"), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def story_text(tmp_path_factory) -> Path:
    """The TinyStories sample, or generated story text when ../shared is absent."""
    path = optional_asset("text/tinystories/tinystories_val_head.txt")
    if path is not None:
        return path
    path = tmp_path_factory.mktemp("stand-in-text") / "stories.txt"
    path.write_text(generated_stories(400))
    return path


@pytest.fixture(scope="session")
def llama_tokenizer():
    """A real llama-style tokenizer: stories260K's tok512, or one trained on generated text."""
    path = optional_asset("stories260K/tok512.bin")
    if path is not None:
        from ropekit.apply.llama2c import read_tokenizer, to_transformers_tokenizer

        return to_transformers_tokenizer(*read_tokenizer(path, 512))
    return trained_tokenizer(generated_stories())


@pytest.fixture(scope="session")
def llama_model_dir(tmp_path_factory, llama_tokenizer) -> Path:
    """A transformers Llama directory (model + tokenizer): stories260K converted, or, without
    ../shared, a random-weight model of the same shape with the trained tokenizer."""
    out = tmp_path_factory.mktemp("llama-model") / "model"
    checkpoint = optional_asset("stories260K/stories260K.bin")
    if checkpoint is not None and optional_asset("stories260K/tok512.bin") is not None:
        from ropekit.apply.llama2c import convert

        return convert(checkpoint, checkpoint.with_name("tok512.bin"), out)
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(llama_tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=5,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    llama_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """A few kilobytes of generated story text: enough for windows of a few hundred tokens, quick to tokenise."""
    path = tmp_path_factory.mktemp("small-text") / "stories.txt"
    path.write_text(generated_stories(24))
    return path


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, llama_tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64, trained length 512) with a real tokenizer, saved: `ropekit eval`
    runs on it in a second or two."""
    folder = tmp_path_factory.mktemp("small-model") / "model"
    tiny_llama(len(llama_tokenizer)).save_pretrained(folder)
    llama_tokenizer.save_pretrained(folder)
    return folder


def write_llama2c(path: Path, *, nan: bool = False, trailing: bytes = b"") -> tuple[Path, Path]:
    import numpy as np

    """A tiny legacy llama2.c checkpoint (dim 8, 1 layer, 2 heads, vocab 32, seq_len 16) and tokenizer."""
    dim, hidden, layers, heads, kv, vocab, seq_len = 8, 16, 1, 2, 2, 32, 16
    head = dim // heads
    floats = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * hidden * dim) + dim + seq_len * head
    weights = np.random.default_rng(0).standard_normal(floats).astype("<f4") * 0.1
    if nan:
        weights[5] = np.nan
    path.mkdir(parents=True, exist_ok=True)
    ckpt = path / "model.bin"
    ckpt.write_bytes(struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq_len) + weights.tobytes() + trailing)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [bytes([c]) for c in range(97, 97 + vocab - 3)]
    tok = path / "tok.bin"
    tok.write_bytes(struct.pack("<i", 8) + b"".join(struct.pack("<fi", -i, len(p)) + p for i, p in enumerate(pieces)))
    return ckpt, tok


def plot_pixels(path: Path, *, min_size: tuple[int, int] = (200, 300)):
    """Decode a PNG written by ropekit and check that it is a real plot: at least `min_size`
    (height, width) pixels, not blank (some ink, and more than two colours). Returns the RGB array."""
    import matplotlib.image
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    rgb = matplotlib.image.imread(path)[..., :3]
    height, width = rgb.shape[:2]
    assert height >= min_size[0] and width >= min_size[1], (path, rgb.shape)
    ink = (rgb < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    assert 0.01 < ink < 0.9, (path, ink)
    assert rgb.std() > 0.05 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 16, path
    return rgb
