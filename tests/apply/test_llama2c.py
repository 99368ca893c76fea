"""llama2.c import: stories260K converted to transformers decodes exactly like an independent
llama2.c forward pass written here (numpy, float64, interleaved RoPE as in run.c)."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
import torch

from conftest import SHARED_ASSETS, require_asset
from ropekit import RopekitError
from ropekit.apply.llama2c import read_checkpoint, read_tokenizer, to_transformers, to_transformers_tokenizer

PROMPT_IDS = [1, 403, 407, 261, 378]  # <s> "Once upon a time"


@pytest.fixture(scope="module")
def assets():
    ckpt = require_asset("stories260K/stories260K.bin")
    return ckpt, ckpt.with_name("stories260K_v1.bin"), ckpt.with_name("tok512.bin")


def test_assets_match_sha256sums(assets):
    sums = dict(line.split()[::-1] for line in (SHARED_ASSETS / "SHA256SUMS").read_text().splitlines())
    for path in assets:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[f"./stories260K/{path.name}"]


# ---- an independent llama2.c (run.c) forward pass --------------------------------------------


def load_reference(path):
    """Parse the legacy checkpoint with nothing but struct and numpy (float64)."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    w = np.frombuffer(raw, dtype=np.float32, offset=28).astype(np.float64)
    head = dim // n_heads
    kv_dim = n_kv * head
    sizes = [
        ("emb", vocab * dim),
        ("att", n_layers * dim),
        ("wq", n_layers * dim * dim),
        ("wk", n_layers * kv_dim * dim),
        ("wv", n_layers * kv_dim * dim),
        ("wo", n_layers * dim * dim),
        ("ffn", n_layers * dim),
        ("w1", n_layers * hidden * dim),
        ("w2", n_layers * dim * hidden),
        ("w3", n_layers * hidden * dim),
        ("norm", dim),
    ]
    p, off = {}, 0
    for name, size in sizes:
        p[name] = w[off : off + size]
        off += size
    p["emb"] = p["emb"].reshape(vocab, dim)
    for name, shape in [
        ("att", (dim,)),
        ("ffn", (dim,)),
        ("wq", (dim, dim)),
        ("wk", (kv_dim, dim)),
        ("wv", (kv_dim, dim)),
        ("wo", (dim, dim)),
        ("w1", (hidden, dim)),
        ("w2", (dim, hidden)),
        ("w3", (hidden, dim)),
    ]:
        p[name] = p[name].reshape(n_layers, *shape)
    return p, dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, head=head, kv_dim=kv_dim)


def rmsnorm(x, weight):
    return weight * x / np.sqrt(np.mean(x * x) + 1e-5)


def rope_interleaved(v, pos, head):
    out = v.copy()
    for i in range(0, v.size, 2):
        freq = 1.0 / 10000.0 ** ((i % head) / head)
        c, s = math.cos(pos * freq), math.sin(pos * freq)
        out[i], out[i + 1] = v[i] * c - v[i + 1] * s, v[i] * s + v[i + 1] * c
    return out


def reference_greedy(p, c, prompt, steps):
    kcache = [[] for _ in range(c["n_layers"])]
    vcache = [[] for _ in range(c["n_layers"])]
    tokens = list(prompt)
    for pos in range(len(prompt) + steps - 1):
        x = p["emb"][tokens[pos]].copy()
        for layer in range(c["n_layers"]):
            xb = rmsnorm(x, p["att"][layer])
            q = rope_interleaved(p["wq"][layer] @ xb, pos, c["head"])
            kcache[layer].append(rope_interleaved(p["wk"][layer] @ xb, pos, c["head"]))
            vcache[layer].append(p["wv"][layer] @ xb)
            keys, values = np.stack(kcache[layer]), np.stack(vcache[layer])
            att_out = np.zeros(c["dim"])
            for h in range(c["n_heads"]):
                kv = h // (c["n_heads"] // c["n_kv"])
                sl, kvsl = slice(h * c["head"], (h + 1) * c["head"]), slice(kv * c["head"], (kv + 1) * c["head"])
                scores = keys[:, kvsl] @ q[sl] / math.sqrt(c["head"])
                weights = np.exp(scores - scores.max())
                att_out[sl] = (weights / weights.sum()) @ values[:, kvsl]
            x = x + p["wo"][layer] @ att_out
            xb = rmsnorm(x, p["ffn"][layer])
            gate = p["w1"][layer] @ xb
            x = x + p["w2"][layer] @ ((gate / (1 + np.exp(-gate))) * (p["w3"][layer] @ xb))
        if pos >= len(prompt) - 1:
            logits = p["emb"] @ rmsnorm(x, p["norm"])
            tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt) :]


@pytest.mark.slow
def test_converted_model_decodes_like_llama2c(assets):
    ckpt, _, _ = assets
    model = to_transformers(*read_checkpoint(ckpt)).double()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT_IDS]), max_new_tokens=120, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    converted = out[0, len(PROMPT_IDS) :].tolist()
    reference = reference_greedy(*load_reference(ckpt), PROMPT_IDS, 120)
    assert converted == reference


def test_v1_and_legacy_formats_hold_the_same_weights(assets):
    legacy, v1, _ = assets
    c0, w0 = read_checkpoint(legacy)
    c1, w1 = read_checkpoint(v1)
    assert (c0.version, c1.version) == (0, 1)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


# ---- tokenizer -----------------------------------------------------------------------------


def llama2c_encode(text, pieces, scores):
    """run.c's encode: dummy prefix, per-character tokens (byte fallback), best-score merges."""
    vocab = {piece: i for i, piece in reversed(list(enumerate(pieces)))}
    tokens = [vocab[b" "]]
    for ch in text:
        code = ch.encode("utf-8")
        tokens += [vocab[code]] if code in vocab else [b + 3 for b in code]
    while True:
        best, best_id, best_i = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = pieces[tokens[i]] + pieces[tokens[i + 1]]
            if merged in vocab and scores[vocab[merged]] > best:
                best, best_id, best_i = scores[vocab[merged]], vocab[merged], i
        if best_i == -1:
            return tokens
        tokens[best_i : best_i + 2] = [best_id]


def test_tokenizer_encodes_like_llama2c(assets):
    pieces, scores = read_tokenizer(assets[2], 512)
    tokenizer = to_transformers_tokenizer(pieces, scores)
    text = require_asset("text/tinystories/tinystories_val_head.txt").read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()][:40] + ["naïve café — 日本 ok"]
    for paragraph in paragraphs:
        ids = tokenizer(paragraph)["input_ids"]
        assert ids == [1] + llama2c_encode(paragraph, pieces, scores), paragraph[:60]
        assert tokenizer.decode(ids, skip_special_tokens=True) == paragraph


@pytest.mark.slow
def test_perplexity_on_tinystories_is_sane(assets):
    ckpt, _, tok = assets
    model = to_transformers(*read_checkpoint(ckpt))
    tokenizer = to_transformers_tokenizer(*read_tokenizer(tok, 512))
    text = require_asset("text/tinystories/tinystories_val_head.txt").read_text()[:60_000]
    ids = torch.tensor(tokenizer(text)["input_ids"][: 512 * 8]).view(8, 512)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # stories260K's reported validation loss is about 1.30 nats (perplexity ≈ 3.7)
    assert 2.0 < math.exp(loss) < 8.0


def test_bad_checkpoints_are_refused(assets, tmp_path):
    ckpt = assets[0]
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(ckpt.read_bytes()[:100_000])
    with pytest.raises(RopekitError, match="truncated"):
        read_checkpoint(truncated)
    garbage = tmp_path / "text.bin"
    garbage.write_bytes(b"hello world, definitely not weights" * 10)
    with pytest.raises(RopekitError, match="not a llama2.c checkpoint"):
        read_checkpoint(garbage)
    with pytest.raises(RopekitError, match="not found"):
        read_checkpoint(tmp_path / "absent.bin")
    with pytest.raises(RopekitError, match="truncated or not a llama2.c tokenizer"):
        read_tokenizer(_cut(assets[2], tmp_path), 512)


def _cut(path, tmp_path):
    out = tmp_path / "tok_cut.bin"
    out.write_bytes(path.read_bytes()[:3000])
    return out
