"""A tiny model whose best plan is known: documents sampled from the model running a chosen plan X.

A random Llama (2 layers, head_dim 16 = 8 rotary pairs, trained length 32) made sharp (LM head
and q/k projections scaled up, so its next-token distribution and attention depend strongly on
position), with a character-level tokenizer (encode(decode(ids)) == ids). Documents are sampled
at temperature 1 from the model running plan X at the long length. The expected NLL of a plan Y
on such documents is the cross-entropy H(p_X, p_Y) ≥ H(p_X), with equality at Y = X: the plan
that minimises the NLL on these documents is X, up to sampling noise.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch

TRAINED = 64
TARGET = 256
X_RAMP = (2.0, 3.0)  # ramp_start, ramp_width of the plan the documents come from (pairs, s = 4)
X_ATTENTION = 1.15
CHARS = string.ascii_lowercase + " .,"


@dataclass(frozen=True)
class KnownOptimum:
    model_dir: Path
    tuning: Path  # folder of documents
    held_out: Path
    x_factors: tuple[float, ...]
    x_attention: float


def char_tokenizer():
    """A real fast tokenizer with one token per character (ids 3 …) and a leading <s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sharp_llama(vocab_size: int, *, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TRAINED,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@torch.no_grad()
def sample(model, *, documents: int, length: int, seed: int) -> torch.Tensor:
    """(documents, length) token ids: <s>, then tokens drawn at temperature 1 (never a special token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.ones(documents, 1, dtype=torch.long),
            torch.randint(3, model.config.vocab_size, (documents, 1), generator=g),
        ],
        1,
    )
    past, current = None, ids
    while ids.shape[1] < length:
        out = model(current, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1]
        logits[:, :3] = -torch.inf
        current = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, current], 1)
    return ids


def build(root: Path, *, documents: int = 8, held_out: int = 4) -> KnownOptimum:
    import ropekit
    from ropekit.choose.space import ramp_factors

    tokenizer = char_tokenizer()
    model = sharp_llama(len(tokenizer))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    spec = ropekit.RopeSpec.from_config(model.config)
    x = ropekit.make_plan(
        spec,
        TARGET,
        "tuned",
        factors=ramp_factors(spec.num_pairs, *X_RAMP, TARGET / TRAINED),
        attention_factor=X_ATTENTION,
    )
    ropekit.apply_plan(model, x, route="inv_freq")
    ids = sample(model, documents=documents + held_out, length=TARGET + 8, seed=1)
    for name, rows in (("tuning", ids[:documents]), ("held_out", ids[documents:])):
        folder = root / name
        folder.mkdir()
        for i, row in enumerate(rows):
            (folder / f"doc{i}.txt").write_text(tokenizer.decode(row[1:].tolist()))
    return KnownOptimum(model_dir, root / "tuning", root / "held_out", tuple(x.factors), X_ATTENTION)


def distance_to_x(factors, attention: float, k: KnownOptimum) -> float:
    """L2 distance of log2 factors to X's, each pair weighted by the share of a turn it makes over the
    window (min(1, L′/λ_i): a pair that barely rotates leaves its factor unseen), plus the attention factor's."""
    import numpy as np

    wavelengths = 2 * np.pi * 10000.0 ** (np.arange(0, 16, 2) / 16)
    weight = np.minimum(1.0, TARGET / wavelengths)
    diff = weight * (np.log2(np.asarray(factors)) - np.log2(np.asarray(k.x_factors)))
    return float(np.sqrt((diff**2).sum() + (attention - k.x_attention) ** 2))
