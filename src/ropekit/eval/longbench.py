"""LongBench-E from local files (Bai et al. 2023), following THUDM/LongBench `LongBench/pred.py`
and `eval.py`: prompts, truncation, greedy generation, post-processing, per-task metrics and
the 0-4k / 4-8k / 8k+ length buckets.

Users download the LongBench-E JSONL files themselves (`<dataset>_e.jsonl`, fields `input`,
`context`, `answers`, `length`, `all_classes`, `dataset`, `_id`) and point `--longbench-dir`
at the folder. Prompt templates and answer budgets are read at run time from the
`config/dataset2prompt.json` and `config/dataset2maxlen.json` that ship with LongBench
(looked for in `--longbench-config`, `<dir>/config`, `<dir>`, `<dir>/../config`); when absent,
ropekit's own wording and LongBench's published budgets are used, and results.json says which.

Protocol, per example (pred.py):
  1. prompt = template.format(context=…, input=…), tokenised with special tokens;
  2. longer than `max_length` tokens → decode the first ⌊max_length/2⌋ tokens and the last
     ⌊max_length/2⌋ tokens (special tokens skipped), concatenate the two texts;
  3. chat models (a tokenizer chat template) get it, except on trec, triviaqa, samsum, lsht,
     lcc, repobench-p (few-shot and code tasks);
  4. re-tokenise, greedy-generate up to the dataset's budget, stop at EOS; samsum also stops
     at a newline and may not stop on its first token;
  5. decode without special tokens; trec, triviaqa, samsum, lsht keep only the first line
     (eval.py); score = max over references (0-1); per bucket round(100 · mean, 2), the
     mean taken by numpy as eval.py's `scorer_e` does (rounding the mean of ×100 scores
     instead can land on the other side of an exact x.xx5).
A bucket without examples is left out of `scores` (scorer_e writes NaN, np.mean of nothing:
not valid JSON, and no score to average); `bucket_sizes` counts every bucket, zeros included.
`max_length` is a per-model setting in LongBench (config/model2maxlen.json: the window minus
500 in whole thousands, e.g. 3500 for a 4096 window); here the same rule is the default, recorded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ropekit.data.documents import decode_text, jsonl_records
from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.longbench_metrics import fuzz_backend, score_sample
from ropekit.eval.passkey import generate_greedy

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


PROTOCOL = "longbench-e/3"  # bump when anything below changes scores
FOLLOWS = "THUDM/LongBench LongBench/pred.py, eval.py, metrics.py"
BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))
REQUIRED_FIELDS = ("input", "context", "answers", "length")
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")  # eval.py post-processing
NO_CHAT_DATASETS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # pred.py: raw prompt
CHAT_MODES = ("auto", "on", "off")
RESERVED_FOR_ANSWER = 500  # model2maxlen.json: max_length = whole thousands of the window − 500


@dataclass(frozen=True)
class Dataset:
    name: str
    template: str  # ropekit's own wording, with {context} and {input}; used without the official file
    metric: str
    max_new_tokens: int  # LongBench's dataset2maxlen value

    @property
    def first_line_only(self) -> bool:
        return self.name in FIRST_LINE_DATASETS

    @property
    def uses_chat(self) -> bool:
        return self.name not in NO_CHAT_DATASETS

    @property
    def stops_at_newline(self) -> bool:
        return self.name == "samsum"


def _qa(kind: str) -> str:
    return f"Answer the question based on the {kind} below. Be concise.\n\n{{context}}\n\nQuestion: {{input}}\nAnswer:"


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset("qasper", _qa("article"), "qa_f1", 128),
        Dataset("multifieldqa_en", _qa("text"), "qa_f1", 64),
        Dataset("hotpotqa", _qa("passages"), "qa_f1", 32),
        Dataset("2wikimqa", _qa("passages"), "qa_f1", 32),
        Dataset("triviaqa", "Answer the question like the examples.\n\n{context}\n\n{input}", "qa_f1", 32),
        Dataset("gov_report", "Summarise the report below.\n\n{context}\n\nSummary:", "rouge_l", 512),
        Dataset("multi_news", "Summarise the news articles below.\n\n{context}\n\nSummary:", "rouge_l", 512),
        Dataset("samsum", "Summarise the dialogue like the examples.\n\n{context}\n\n{input}", "rouge_l", 128),
        Dataset("trec", "Classify the question like the examples.\n\n{context}\n{input}", "classification", 64),
        Dataset(
            "passage_count",
            "How many different paragraphs are there among the paragraphs below (some may "
            "repeat)?\n\n{context}\n\nAnswer with a single number.\nThe final answer is: ",
            "count",
            32,
        ),
        Dataset(
            "passage_retrieval_en",
            "Which paragraph does the abstract come from?\n\n{context}\n\nAbstract: "
            '{input}\n\nAnswer in the form "Paragraph N".\nThe answer is: ',
            "retrieval",
            32,
        ),
        Dataset("lcc", "Complete the code.\n{context}Next line of code:\n", "edit_sim", 64),
        Dataset("repobench-p", "Complete the code.\n{context}{input}Next line of code:\n", "edit_sim", 64),
    ]
}


@dataclass(frozen=True)
class Example:
    dataset: str
    id: str
    input: str
    context: str
    answers: list[str]
    length: int  # words, as recorded by LongBench
    all_classes: list[str] | None


@dataclass(frozen=True)
class PromptConfig:
    """Templates and answer budgets per dataset, and where they came from."""

    templates: dict[str, str]
    max_new_tokens: dict[str, int]
    prompt_source: str  # "official file: PATH" or "ropekit wording"
    budget_source: str

    @classmethod
    def fallback(cls) -> PromptConfig:
        return cls(
            {n: d.template for n, d in DATASETS.items()},
            {n: d.max_new_tokens for n, d in DATASETS.items()},
            "ropekit wording",
            "ropekit table (LongBench's published values)",
        )


def dataset_name(path: Path) -> str:
    stem = path.stem
    return stem[:-2] if stem.endswith("_e") else stem


def config_candidates(data_dir: str | Path, config_dir: str | Path | None) -> list[Path]:
    root = Path(data_dir)
    if config_dir is not None:
        return [Path(config_dir)]
    return [root / "config", root, root.parent / "config"]


def _read_json_table(path: Path, kind: type) -> dict:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RopekitError(f"{path}: not a valid JSON file") from None
    if not isinstance(table, dict) or not all(isinstance(v, kind) for v in table.values()):
        raise RopekitError(f"{path}: expected a JSON object of dataset → {kind.__name__}")
    return table


def load_prompt_config(data_dir: str | Path, config_dir: str | Path | None = None) -> PromptConfig:
    """Official dataset2prompt.json / dataset2maxlen.json when found, else ropekit's fallback (per file)."""
    if config_dir is not None and not Path(config_dir).is_dir():
        raise RopekitError(f"{config_dir}: --longbench-config must be a folder holding dataset2prompt.json")
    config = PromptConfig.fallback()
    templates, budgets = dict(config.templates), dict(config.max_new_tokens)
    prompt_source, budget_source = config.prompt_source, config.budget_source
    folder = next((c for c in config_candidates(data_dir, config_dir) if (c / "dataset2prompt.json").is_file()), None)
    if folder is not None:
        templates.update(_read_json_table(folder / "dataset2prompt.json", str))
        prompt_source = f"official file: {folder / 'dataset2prompt.json'}"
    folder = next((c for c in config_candidates(data_dir, config_dir) if (c / "dataset2maxlen.json").is_file()), None)
    if folder is not None:
        budgets.update(_read_json_table(folder / "dataset2maxlen.json", int))
        budget_source = f"official file: {folder / 'dataset2maxlen.json'}"
    return PromptConfig(templates, budgets, prompt_source, budget_source)


def load_longbench(folder: str | Path, datasets: list[str] | None = None) -> dict[str, list[Example]]:
    """Read `<dataset>_e.jsonl` files (or `<dataset>.jsonl`) from a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise RopekitError(f"{folder}: not a folder of LongBench-E JSONL files")
    files = {dataset_name(p): p for p in sorted(root.glob("*.jsonl"))}
    wanted = datasets or [name for name in files if name in DATASETS]
    if not wanted:
        raise RopekitError(f"{folder}: no LongBench-E files found (expected e.g. hotpotqa_e.jsonl)")
    out = {}
    for name in wanted:
        if name not in DATASETS:
            raise did_you_mean("LongBench dataset", name, DATASETS)
        if name not in files:
            raise RopekitError(f"{folder}: no {name}_e.jsonl")
        out[name] = _read_examples(files[name], name)
    return out


def _read_examples(path: Path, name: str) -> list[Example]:
    examples = []
    for number, record in jsonl_records(path):
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing or not isinstance(record.get("answers"), list):
            raise RopekitError(
                f"{path}:{number}: a LongBench record needs {', '.join(REQUIRED_FIELDS)} "
                f"(answers a list); missing {', '.join(missing) or 'a list of answers'}"
            )
        examples.append(
            Example(
                name,
                str(record.get("_id", number)),
                record["input"],
                record["context"],
                [str(a) for a in record["answers"]],
                int(record["length"]),
                record.get("all_classes"),
            )
        )
    if not examples:
        raise RopekitError(f"{path}: no records")
    return examples


def default_max_length(window: int) -> int:
    """LongBench's per-model prompt budget (config/model2maxlen.json): the window in whole thousands
    minus 500 (4096 → 3500, 8192 → 7500, 32768 → 31500); never below half the window."""
    return max(1000 * (window // 1000) - RESERVED_FOR_ANSWER, window // 2)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def truncate_middle(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> str:
    """pred.py's truncation: over `max_length` tokens → decoded first half + decoded last half (text)."""
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    return decode_text(tokenizer, ids[:half], skip_special_tokens=True) + decode_text(
        tokenizer, ids[len(ids) - half :], skip_special_tokens=True
    )


def build_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    max_length: int,
    config: PromptConfig | None = None,
    chat: bool = False,
) -> list[int]:
    """Token ids of the prompt the model sees (steps 1-3 of the module docstring)."""
    config = config or PromptConfig.fallback()
    template = config.templates[example.dataset]
    try:
        prompt = template.format(context=example.context, input=example.input)
    except (KeyError, IndexError, ValueError):
        raise RopekitError(
            f"{example.dataset}: prompt template needs fields other than {{context}} and {{input}}"
        ) from None
    prompt = truncate_middle(tokenizer, prompt, max_length)
    if chat and DATASETS[example.dataset].uses_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def stop_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset) -> list[int]:
    """EOS ids generation stops at: the model's generation config (as model.generate uses), else the
    tokenizer's; samsum: the tokenizer's EOS and the newline token (pred.py)."""
    if dataset.stops_at_newline:
        newline = tokenizer.encode("\n", add_special_tokens=False)
        return [t for t in (tokenizer.eos_token_id, newline[-1] if newline else None) if t is not None]
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def bucket_of(length: int) -> str:
    return next(name for name, lo, hi in BUCKETS if lo <= length < hi)


def scorer_e(scores: list[float], lengths: list[int]) -> dict[str, float]:
    """eval.py's scorer_e over one dataset: round(100 · np.mean(bucket scores), 2) for each length
    bucket that has examples; `scores` are per-example (0-1), `lengths` LongBench's word counts."""
    by_bucket: dict[str, list[float]] = defaultdict(list)
    for score, length in zip(scores, lengths):
        by_bucket[bucket_of(length)].append(score)
    return {name: round(100 * float(np.mean(by_bucket[name])), 2) for name, _, _ in BUCKETS if by_bucket[name]}


EMPTY_BUCKETS = (
    "absent from scores (eval.py's scorer_e writes NaN, the mean of no examples: not valid JSON and "
    "no score to average over datasets); bucket_sizes counts them as 0"
)


@dataclass
class LongBenchResult:
    window: int
    max_length: int  # prompt tokens before middle truncation
    chat_template: bool  # applied on the datasets that use it
    prompts: str  # prompt source
    budgets: str  # source of the answer budgets
    protocol: str = PROTOCOL
    follows: str = FOLLOWS
    code_similarity: str = field(default_factory=lambda: f"fuzzywuzzy fuzz.ratio ({fuzz_backend()})")
    rounding: str = "round(100 · np.mean(example scores), 2) per bucket, as eval.py's scorer_e"
    empty_buckets: str = EMPTY_BUCKETS
    bucket_sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset → bucket → examples
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset → bucket → score (0–100)
    average: dict[str, float] = field(default_factory=dict)  # bucket → mean over datasets
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_chat(tokenizer: PreTrainedTokenizerBase, chat: str) -> bool:
    if chat not in CHAT_MODES:
        raise RopekitError(f"chat template mode must be one of {', '.join(CHAT_MODES)}, got {chat!r}")
    if chat == "on" and not has_chat_template(tokenizer):
        raise RopekitError("--longbench-chat on: this tokenizer has no chat template")
    return chat == "on" or (chat == "auto" and has_chat_template(tokenizer))


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    max_length: int,
    config: PromptConfig,
    chat: bool,
) -> str:
    """Steps 1-5 up to the post-processed prediction text."""
    spec = DATASETS[example.dataset]
    ids = build_prompt_ids(tokenizer, example, max_length=max_length, config=config, chat=chat)
    tokens = generate_greedy(
        model,
        ids,
        config.max_new_tokens[example.dataset],
        stop_ids=stop_tokens(model, tokenizer, spec),
        no_stop_first=spec.stops_at_newline,
    )
    prediction = decode_text(tokenizer, tokens, skip_special_tokens=True)
    return prediction.lstrip("\n").split("\n")[0] if spec.first_line_only else prediction


def run_longbench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[str, list[Example]],
    *,
    window: int,
    max_length: int | None = None,
    config: PromptConfig | None = None,
    chat: str = "auto",
    progress: bool = False,
    label: str = "",
) -> LongBenchResult:
    """Generate and score every example; bucket scores as eval.py's scorer_e (×100, rounded to 2 places)."""
    config = config or PromptConfig.fallback()
    max_length = max_length or default_max_length(window)
    if max_length < 2:
        raise RopekitError(f"LongBench max_length must be ≥ 2 tokens, got {max_length}")
    use_chat = resolve_chat(tokenizer, chat)
    result = LongBenchResult(window, max_length, use_chat, config.prompt_source, config.budget_source)
    items = [e for group in examples.values() for e in group]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"{label + ' · ' if label else ''}longbench-e", unit="example", leave=False)
    scores: dict[str, list[float]] = defaultdict(list)  # dataset → example scores (0-1), in order
    for ex in items:
        spec = DATASETS[ex.dataset]
        prediction = predict(model, tokenizer, ex, max_length=max_length, config=config, chat=use_chat)
        scores[ex.dataset].append(score_sample(spec.metric, prediction, ex.answers, ex.all_classes))
        result.rows.append(
            {
                "dataset": ex.dataset,
                "id": ex.id,
                "bucket": bucket_of(ex.length),
                "metric": spec.metric,
                "prediction": prediction,
                "score": 100 * scores[ex.dataset][-1],
            }
        )
    for name, group in examples.items():
        lengths = [ex.length for ex in group]
        result.scores[name] = scorer_e(scores[name], lengths)
        result.bucket_sizes[name] = {b: sum(bucket_of(n) == b for n in lengths) for b, _, _ in BUCKETS}
    for bucket, _, _ in BUCKETS:
        values = [s[bucket] for s in result.scores.values() if bucket in s]
        if values:
            result.average[bucket] = sum(values) / len(values)
    return result
