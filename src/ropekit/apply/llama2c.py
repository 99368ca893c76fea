"""Read llama2.c checkpoints and tokenizers, and convert them to transformers.

Checkpoint formats (karpathy/llama2.c `export.py`):
  legacy: 7 × int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
          seq_len; vocab_size < 0 means an unshared classifier), then float32 weights:
          tok_embeddings, attention_norm[L], wq[L], wk[L], wv[L], wo[L], ffn_norm[L],
          w1[L], w2[L], w3[L], norm, freq_cis_real, freq_cis_imag, (output).
  v1 "ak42": uint32 magic 0x616b3432, int32 version 1, the same 7 int32, uint8
          shared_classifier, zero padding to 256 bytes, then float32 weights:
          attention_norm[L], ffn_norm[L], norm, tok_embeddings, wq[L], wk[L], wv[L], wo[L],
          w1[L], w2[L], w3[L], (output).
Every matrix is stored in PyTorch (out_features, in_features) layout.

RoPE pairing: llama2.c rotates interleaved pairs (2j, 2j+1); transformers rotates halves
(j, j + head_dim/2). The q and k projections are permuted per head so the converted model
computes the same attention.

Tokenizer (`tokenizer.bin`): int32 max_token_length, then per token: float32 score,
int32 byte length, bytes. Pieces use ' ' where SentencePiece uses '▁'.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ropekit.errors import RopekitError
from ropekit.output import OutputTarget

KIND = "converted model"  # the kind of output in its manifest (ropekit.manifest)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

V1_MAGIC = 0x616B3432
V1_HEADER_BYTES = 256


@dataclass(frozen=True)
class Llama2cConfig:
    dim: int  # model width
    hidden_dim: int  # FFN width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int  # training context, tokens
    shared_classifier: bool  # output projection tied to the token embedding
    version: int  # 0 = legacy, 1 = "ak42"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def read_checkpoint(path: str | Path) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    """Parse a llama2.c checkpoint into its config and llama2.c-named float32 tensors."""
    data = _read_bytes(path, "checkpoint")
    config, offset = _parse_header(data, path)
    shapes = _weight_shapes(config)
    needed = sum(int(np.prod(s)) for _, s in shapes) * 4
    if config.version == 0:
        freq_floats = config.seq_len * config.head_dim  # freq_cis_real + freq_cis_imag, skipped
        needed += freq_floats * 4
    if len(data) - offset < needed:
        raise RopekitError(f"{path}: truncated checkpoint: {len(data) - offset} bytes of weights, expected {needed}")
    if len(data) - offset > needed:
        raise RopekitError(
            f"{path}: {len(data) - offset - needed} unexpected bytes after the weights the header "
            f"describes ({needed} bytes); not a llama2.c checkpoint of this shape, or corrupted"
        )
    floats = np.frombuffer(data, dtype="<f4", offset=offset)
    weights, cursor = {}, 0
    for name, shape in shapes:
        if name == "output.weight" and config.version == 0:
            cursor += config.seq_len * config.head_dim  # legacy puts the RoPE tables before the classifier
        count = int(np.prod(shape))
        weights[name] = torch.from_numpy(floats[cursor : cursor + count].reshape(shape).copy())
        cursor += count
    return config, weights


def _read_bytes(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise RopekitError(f"{path}: {what} file not found")
    return p.read_bytes()


def _parse_header(data: bytes, path: str | Path) -> tuple[Llama2cConfig, int]:
    if len(data) < 28:
        raise RopekitError(f"{path}: too short to be a llama2.c checkpoint")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == V1_MAGIC:
        if len(data) < V1_HEADER_BYTES:
            raise RopekitError(f"{path}: truncated v1 header")
        version = struct.unpack_from("<i", data, 4)[0]
        if version != 1:
            raise RopekitError(f"{path}: llama2.c format version {version} is not supported (only legacy and v1)")
        fields = struct.unpack_from("<7i", data, 8)
        shared = bool(struct.unpack_from("<B", data, 36)[0])
        offset, vocab = V1_HEADER_BYTES, fields[5]
    else:
        version, fields, offset = 0, struct.unpack_from("<7i", data, 0), 28
        shared, vocab = fields[5] > 0, abs(fields[5])
    dim, hidden, layers, heads, kv_heads, _, seq_len = fields
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads or heads % kv_heads or dim > 65536:
        raise RopekitError(f"{path}: not a llama2.c checkpoint (implausible header {fields})")
    if (dim // heads) % 2:  # RoPE rotates pairs of dimensions
        raise RopekitError(f"{path}: not a llama2.c checkpoint (odd head dimension {dim // heads})")
    config = Llama2cConfig(dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared, version)
    return config, offset


def _weight_shapes(c: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    kv_dim = c.n_kv_heads * c.head_dim
    per_layer = {
        "attention_norm": (c.dim,),
        "ffn_norm": (c.dim,),
        "wq": (c.dim, c.dim),
        "wk": (kv_dim, c.dim),
        "wv": (kv_dim, c.dim),
        "wo": (c.dim, c.dim),
        "w1": (c.hidden_dim, c.dim),
        "w2": (c.dim, c.hidden_dim),
        "w3": (c.hidden_dim, c.dim),
    }

    def layers(kind: str) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"layers.{i}.{kind}", per_layer[kind]) for i in range(c.n_layers)]

    embed: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (c.vocab_size, c.dim))]
    norm: list[tuple[str, tuple[int, ...]]] = [("norm.weight", (c.dim,))]
    if c.version == 1:
        order = layers("attention_norm") + layers("ffn_norm") + norm + embed
        order += sum((layers(k) for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")), [])
    else:
        order = embed + layers("attention_norm") + sum((layers(k) for k in ("wq", "wk", "wv", "wo")), [])
        order += layers("ffn_norm") + sum((layers(k) for k in ("w1", "w2", "w3")), []) + norm
    if not c.shared_classifier:
        order.append(("output.weight", (c.vocab_size, c.dim)))
    return order


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from interleaved RoPE pairs to transformers' rotate-half.

    Per head, output rows (2j, 2j+1) become (j, j + head_dim/2). Shape (n_heads·head_dim, in).
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def to_transformers(
    config: Llama2cConfig, weights: dict[str, torch.Tensor], *, rope_theta: float = 10000.0
) -> LlamaForCausalLM:
    """Build a transformers `LlamaForCausalLM` with the llama2.c weights (asserting every shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.seq_len,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=config.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        dtype="float32",
    )
    model = LlamaForCausalLM(hf_config)
    state = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"]}
    names = {
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
    }
    for i in range(config.n_layers):
        for src, dst in names.items():
            state[f"model.layers.{i}.{dst}.weight"] = weights[f"layers.{i}.{src}"]
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = interleaved_to_half(
            weights[f"layers.{i}.wq"], config.n_heads
        )
        state[f"model.layers.{i}.self_attn.k_proj.weight"] = interleaved_to_half(
            weights[f"layers.{i}.wk"], config.n_kv_heads
        )
    state["lm_head.weight"] = weights.get("output.weight", weights["tok_embeddings.weight"])
    expected = model.state_dict()
    for name, tensor in state.items():
        assert expected[name].shape == tensor.shape, f"{name}: {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
    missing = set(expected) - set(state)
    assert not missing, f"weights not filled: {sorted(missing)}"
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_tokenizer(path: str | Path, vocab_size: int) -> tuple[list[bytes], list[float]]:
    """Pieces (bytes, with ' ' for '▁') and scores from a llama2.c `tokenizer.bin`."""
    data = _read_bytes(path, "tokenizer")
    pieces, scores, offset = [], [], 4
    try:
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise struct.error("bad piece length")
            pieces.append(data[offset : offset + length])
            scores.append(score)
            offset += length
    except struct.error:
        raise RopekitError(
            f"{path}: truncated or not a llama2.c tokenizer for a {vocab_size}-token vocabulary"
        ) from None
    return pieces, scores


SPECIAL_PIECES = {0: "<unk>", 1: "<s>", 2: "</s>"}  # llama2.c writes BOS/EOS as "\n<s>\n", "\n</s>\n"


def to_transformers_tokenizer(pieces: list[bytes], scores: list[float]) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer that encodes like llama2.c's `encode` (run.c).

    llama2.c prepends a ' ' (dummy prefix), starts from one token per UTF-8 character (bytes
    <0xXX> for unknown ones), then repeatedly merges the adjacent pair whose concatenation
    is the vocabulary piece with the highest score. A BPE whose merges are every split of
    every piece, ranked by the merged piece's score, does exactly that.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for i, raw in enumerate(pieces):
        piece = SPECIAL_PIECES.get(i) or raw.decode("utf-8", errors="replace").replace(" ", "▁")
        vocab.setdefault(piece, i)
    merges = []
    for piece, i in sorted(vocab.items(), key=lambda kv: (-scores[kv[1]], kv[1])):
        if i in SPECIAL_PIECES or piece.startswith("<0x") or len(piece) < 2:
            continue
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def convert(
    checkpoint: str | Path,
    tokenizer: str | Path,
    out_dir: OutputTarget | str | Path,
    *,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint + tokenizer.bin to a transformers model directory.

    `out_dir`: a path or a `prepare_output` target. Writes into a temporary sibling directory
    and renames it into place, so a failure leaves nothing partial at `out_dir`. Refuses
    checkpoints with NaN or inf weights unless `allow_non_finite`.
    """
    from ropekit.output import atomic_directory, prepare_output

    if not isinstance(out_dir, OutputTarget):
        out_dir = prepare_output(out_dir, kind=KIND, overwrite=overwrite, inputs=(checkpoint, tokenizer))
    config, weights = read_checkpoint(checkpoint)
    if not allow_non_finite:
        check_finite_weights(weights, checkpoint)
    pieces, scores = read_tokenizer(tokenizer, config.vocab_size)
    model = to_transformers(config, weights)
    hf_tokenizer = to_transformers_tokenizer(pieces, scores)
    with atomic_directory(out_dir, overwrite=overwrite, kind=KIND) as tmp:
        model.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)
    return out_dir.path


def check_finite_weights(weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or inf, naming the first tensor and the count."""
    for name, tensor in weights.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise RopekitError(
                f"{source}: {bad} NaN/inf values in {name}; the model would output NaN "
                "(pass --allow-non-finite / allow_non_finite=True to convert anyway)"
            )
