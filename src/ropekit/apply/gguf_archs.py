"""What llama.cpp can run of a plan, per GGUF architecture: the table `ARCHITECTURES`, read from its source.

Source: ggml-org/llama.cpp at commit 0c1e57098bba (`LLAMA_CPP_COMMIT`), the `vendor/llama.cpp` submodule of
llama-cpp-python 0.3.36 (the version in constraints.txt). Paths and line numbers below are in that tree;
`scripts/llamacpp_rope_survey.py LLAMA_CPP_DIR` lists the same facts for any checkout, to re-read them
when the pin moves.

Every graph rotates Q and K with `ggml_rope_ext(ctx, x, pos, freq_factors, n_rot, mode, n_ctx_orig,
freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow)`; the CPU kernel
(ggml/src/ggml-cpu/ops.cpp:6187-6216) rotates pair i at θ_i / freq_factors[i], YaRN-ramped between ×1 and
×freq_scale when ext_factor ≠ 0. What a GGUF can change, per architecture, is therefore:

- **per-pair** (`per_pair` names the tensor): the graph passes a factor tensor as `freq_factors`, so any
  list of divisors f_i runs, i.e. every plan. `rope_freqs.weight` (llama and the architectures that
  copied its loader; loaded unless the scaling type is longrope), or `rope_factors_long/short.weight`
  (phi3: llama.cpp picks long or short by context, `llama_model::get_rope_factors`,
  src/llama-model.cpp:2337; ropekit writes both equal).
- **native only**: `freq_factors` is nullptr, so only what the graph derives from `<arch>.rope.scaling.*`
  runs: `freq_scale` = 1/`rope.scaling.factor` (linear, or YaRN with `rope.scaling.type = yarn` and its
  ramp over `rope.scaling.original_context_length`), and the magnitude `rope.scaling.attn_factor`
  (src/llama-model.cpp:1410-1431, src/llama-context.cpp:165-214). So `pi`/`linear` and `yarn` plans run;
  a per-pair plan (dprope, llama3, longrope, …) cannot be expressed and is refused.
- **refused**: the graph has no RoPE that ropekit can plan (multimodal M-RoPE sections, removed rotations).

`layers` says which layers the scaling reaches. Sliding-window layers of an iSWA graph take
`llama_model::get_rope_freq_base/scale` (src/llama-model.cpp:2329-2335): `rope_freq_scale_train_swa`,
which some architectures copy from the file's factor (then every layer is scaled) and others leave at
1.0 (then only the full-attention layers are, as ropekit's per-layer-type plans for Gemma 3).
Architectures not in the table are refused until someone reads their graph.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_PYTHON = "0.3.36"

ROPE_FREQS = "rope_freqs.weight"
LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
NATIVE_TYPES = ("linear", "yarn")  # transformers rope_types that llama.cpp's rope.scaling.* expresses
YARN_DEFAULT_BETAS = (32.0, 1.0)  # llama.cpp's β_fast, β_slow when the file has no keys (src/llama-hparams.h:161-162)


@dataclass(frozen=True)
class ArchRope:
    """How llama.cpp's graph for one GGUF architecture applies RoPE scaling."""

    name: str  # general.architecture
    per_pair: str | None  # the factor tensor the graph applies: ROPE_FREQS, "longrope" (LONGROPE_TENSORS), or None
    layers: str  # layers the scaling reaches: "all" (every RoPE layer) or "full_attention" (not the sliding ones)
    source: str  # where in llama.cpp's tree this was read (paths relative to the repository root)
    yarn_betas: bool = False  # reads rope.scaling.yarn_beta_fast/_slow (else β = 32, 1: src/llama-hparams.h:161-162)
    refused: str | None = None  # why no plan runs (None: it does)

    @property
    def support(self) -> str:
        """ "per-pair", "native only" or "refused"."""
        if self.refused:
            return "refused"
        return "per-pair" if self.per_pair else "native only"

    @property
    def tensors(self) -> tuple[str, ...]:
        """The GGUF tensors that carry per-pair factors for this architecture."""
        return {ROPE_FREQS: (ROPE_FREQS,), "longrope": LONGROPE_TENSORS}.get(self.per_pair or "", ())


def _per_pair(name: str, source: str, *, tensor: str = ROPE_FREQS, yarn_betas: bool = False) -> ArchRope:
    return ArchRope(name, tensor, "all", source, yarn_betas=yarn_betas)


def _native(name: str, source: str, *, layers: str = "all") -> ArchRope:
    return ArchRope(name, None, layers, source)


def _refused(name: str, source: str, reason: str) -> ArchRope:
    return ArchRope(name, None, "all", source, refused=reason)


_RF = "creates rope_freqs (all layers) :{0}; get_rope_factors → ggml_rope_ext :{1}"
_NATIVE = "ggml_rope_ext(…, nullptr, …, freq_base, freq_scale, ext_factor, attn_factor, …) :{0}"

# fmt: off
ARCHITECTURES: dict[str, ArchRope] = {a.name: a for a in (
    # per-pair: rope_freqs.weight on every layer (TENSOR_DUPLICATED from layer 1 on)
    _per_pair("llama", "src/models/llama.cpp " + _RF.format(66, 140)),
    _per_pair("deci", "src/models/deci.cpp " + _RF.format(60, 122)),
    _per_pair("mistral3", "src/models/mistral3.cpp " + _RF.format(61, 131) + "; yarn betas :7-8", yarn_betas=True),
    _per_pair("arcee", "src/models/arcee.cpp " + _RF.format(37, 80)),
    _per_pair("exaone", "src/models/exaone.cpp " + _RF.format(35, 75)),
    _per_pair("exaone4", "src/models/exaone4.cpp " + _RF.format(52, 117) + "; RoPE on sliding layers only :111"),
    _per_pair("granite", "src/models/granite.cpp " + _RF.format(91, 217)),
    _per_pair("granitehybrid", "src/models/granite-hybrid.cpp " + _RF.format("106,120", 211)),
    _per_pair("apertus", "src/models/apertus.cpp " + _RF.format(35, 87)),
    _per_pair("nanbeige", "src/models/nanbeige.cpp " + _RF.format(57, 113)),
    # per-pair: rope_factors_long/short.weight, loaded whatever the scaling type
    _per_pair("phi3", "src/models/phi3.cpp creates rope_factors_long/short :54-55; get_rope_factors :97",
              tensor="longrope"),
    # native only: no factor tensor reaches ggml_rope_ext
    _native("qwen2", "src/models/qwen2.cpp " + _NATIVE.format(86)),
    _native("qwen2moe", "src/models/qwen2moe.cpp " + _NATIVE.format(98)),
    _native("qwen3", "src/models/qwen3.cpp " + _NATIVE.format(91)),
    _native("qwen3moe", "src/models/qwen3moe.cpp " + _NATIVE.format(100)),
    _native("gemma", "src/models/gemma.cpp " + _NATIVE.format(72)),
    _native("gemma2", "src/models/gemma2.cpp " + _NATIVE.format(94) + " with get_rope_freq_scale :80; "
            "rope_freq_scale_train_swa = the file's scale :9, so sliding layers are scaled too"),
    _native("gemma3", "src/models/gemma3.cpp " + _NATIVE.format(134) + " with get_rope_freq_scale :115; "
            "rope_freq_scale_train_swa stays 1.0 (src/llama-hparams.h:153), sliding base rope.freq_base_swa :9",
            layers="full_attention"),
    _native("olmo2", "src/models/olmo2.cpp " + _NATIVE.format(133) + " on full layers; sliding layers "
            "freq_scale 1.0, ext_factor 0, attn_factor 1.0 :121", layers="full_attention"),
    _native("gpt-oss", "src/models/openai-moe.cpp " + _NATIVE.format(95) + " with get_rope_freq_scale :79; "
            "rope_freq_scale_train_swa = the file's scale :12"),
    _native("starcoder2", "src/models/starcoder2.cpp " + _NATIVE.format(92)),
    _native("stablelm", "src/models/stablelm.cpp " + _NATIVE.format(99)),
    _native("gptneox", "src/models/gptneox.cpp " + _NATIVE.format(116)),
    _native("phi2", "src/models/phi2.cpp " + _NATIVE.format(77)),
    _native("falcon", "src/models/falcon.cpp " + _NATIVE.format(94)),
    _native("internlm2", "src/models/internlm2.cpp " + _NATIVE.format(74)),
    _native("olmo", "src/models/olmo.cpp " + _NATIVE.format(76)),
    _native("olmoe", "src/models/olmoe.cpp " + _NATIVE.format(103)),
    _native("command-r", "src/models/command-r.cpp " + _NATIVE.format(83)),
    _native("smollm3", "src/models/smollm3.cpp " + _NATIVE.format(84)),
    _native("ernie4_5", "src/models/ernie4-5.cpp " + _NATIVE.format(108)),
    _native("baichuan", "src/models/baichuan.cpp " + _NATIVE.format(79)),
    _native("xverse", "src/models/xverse.cpp " + _NATIVE.format(72)),
    _native("orion", "src/models/orion.cpp " + _NATIVE.format(76)),
    _native("minimax-m2", "src/models/minimax-m2.cpp " + _NATIVE.format(95)),
    _native("seed_oss", "src/models/seed-oss.cpp " + _NATIVE.format(84)),
    _native("bitnet", "src/models/bitnet.cpp " + _NATIVE.format(81)),
    _native("nemotron", "src/models/nemotron.cpp " + _NATIVE.format(84)),
    _native("dots1", "src/models/dots1.cpp " + _NATIVE.format(109)),
    _native("chatglm", "src/models/chatglm.cpp " + _NATIVE.format(90)),
    # refused
    *(
        _refused(name, "src/llama-model.cpp:3023 llama_model_rope_type → M-RoPE / interleaved M-RoPE",
                 "multimodal RoPE sections (M-RoPE) are not supported")
        for name in ("qwen2vl", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe")
    ),
    _refused("gemma4", "src/models/gemma4.cpp:96 rope_freqs on full-attention layers only, for proportional RoPE",
             "proportional RoPE (pairs whose rotation is removed) is not supported yet"),
    _refused("deepseek2", "src/models/deepseek2.cpp:311 MLA with its own YaRN magnitude (rope.scaling.yarn_log_multiplier)",
             "MLA's decoupled RoPE with its own YaRN magnitude is not supported"),
)}
# fmt: on


def arch_rope(name: str) -> ArchRope | None:
    """The table's record for a GGUF architecture, or None when ropekit has not read its graph."""
    return ARCHITECTURES.get(name)


def native_methods() -> list[str]:
    """Registered methods whose native form llama.cpp's rope.scaling.* expresses (linear, yarn)."""
    from ropekit.plan.registry import METHODS

    return [name for name, m in METHODS.items() if m.transformers_type in NATIVE_TYPES]


def support_line(arch: ArchRope | None, name: str) -> str:
    """One phrase for `inspect` and errors: what llama.cpp can run of a plan for this architecture."""
    if arch is None:
        return f"not supported: ropekit has not read llama.cpp's {name!r} graph (see ropekit.apply.gguf_archs)"
    if arch.refused:
        return f"refused: {arch.refused}"
    layers = "" if arch.layers == "all" else ", full-attention layers only"
    if arch.per_pair:
        return f"per-pair: every method ({', '.join(arch.tensors)}{layers})"
    return f"native only: {', '.join(native_methods())} (rope.scaling.*{layers}); per-pair plans are refused"


def markdown_table() -> str:
    """The README table of `ARCHITECTURES` (tests check the README holds exactly this)."""
    rows = [
        "| GGUF architecture | llama.cpp applies | plans that run | layers scaled | read in llama.cpp |",
        "|---|---|---|---|---|",
    ]
    for a in ARCHITECTURES.values():
        applies = {
            ROPE_FREQS: "`rope_freqs.weight`",
            "longrope": "`rope_factors_long/short.weight`",
        }.get(a.per_pair or "", "`rope.scaling.*` only")
        runs = {"per-pair": "every method", "native only": ", ".join(native_methods())}.get(a.support, "none")
        if a.refused:
            applies, runs = "—", f"refused: {a.refused}"
        layers = "all" if a.layers == "all" else "full-attention only"
        rows.append(f"| `{a.name}` | {applies} | {runs} | {layers} | {a.source} |")
    return "\n".join(rows)
