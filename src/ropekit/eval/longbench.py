"""LongBench-E from local files (Bai et al. 2023): prompts, greedy generation, per-task metrics,
and the 0-4k / 4-8k / 8k+ length buckets the paper reports.

Users download the LongBench-E JSONL files themselves (`<dataset>_e.jsonl`, fields `input`,
`context`, `answers`, `length`, `all_classes`, `dataset`, `_id`) and point `--longbench-dir`
at the folder. Each dataset is one record in `DATASETS` (prompt template, metric, answer
length), as data. Prompts longer than the window are truncated in the middle, keeping the
head and the tail, as LongBench does. Few-shot and code tasks keep only the first line of
the continuation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.data import jsonl_records
from ropekit.eval.longbench_metrics import score_sample
from ropekit.eval.passkey import generate_greedy

BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))
REQUIRED_FIELDS = ("input", "context", "answers", "length")


@dataclass(frozen=True)
class Dataset:
    name: str
    template: str  # with {context} and {input}
    metric: str
    max_new_tokens: int
    first_line_only: bool = False  # few-shot and code tasks answer on one line


def _qa(kind: str) -> str:
    return (f"Answer the question based on the {kind} below. Be concise.\n\n{{context}}\n\n"
            "Question: {input}\nAnswer:")


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset("qasper", _qa("article"), "qa_f1", 128),
    Dataset("multifieldqa_en", _qa("text"), "qa_f1", 64),
    Dataset("hotpotqa", _qa("passages"), "qa_f1", 32),
    Dataset("2wikimqa", _qa("passages"), "qa_f1", 32),
    Dataset("triviaqa", "Answer the question like the examples.\n\n{context}\n\n{input}", "qa_f1", 32, True),
    Dataset("gov_report", "Summarise the report below.\n\n{context}\n\nSummary:", "rouge_l", 512),
    Dataset("multi_news", "Summarise the news articles below.\n\n{context}\n\nSummary:", "rouge_l", 512),
    Dataset("samsum", "Summarise the dialogue like the examples.\n\n{context}\n\n{input}", "rouge_l", 128, True),
    Dataset("trec", "Classify the question like the examples.\n\n{context}\n{input}", "classification", 64, True),
    Dataset("passage_count", "How many different paragraphs are there among the paragraphs below (some may "
            "repeat)?\n\n{context}\n\nAnswer with a single number.\nThe final answer is: ", "count", 32),
    Dataset("passage_retrieval_en", "Which paragraph does the abstract come from?\n\n{context}\n\nAbstract: "
            "{input}\n\nAnswer in the form \"Paragraph N\".\nThe answer is: ", "retrieval", 32),
    Dataset("lcc", "Complete the code.\n{context}Next line of code:\n", "edit_sim", 64, True),
    Dataset("repobench-p", "Complete the code.\n{context}{input}Next line of code:\n", "edit_sim", 64, True),
]}


@dataclass(frozen=True)
class Example:
    dataset: str
    id: str
    input: str
    context: str
    answers: list[str]
    length: int  # words, as recorded by LongBench
    all_classes: list[str] | None


def dataset_name(path: Path) -> str:
    stem = path.stem
    return stem[:-2] if stem.endswith("_e") else stem


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
            raise RopekitError(f"{path}:{number}: a LongBench record needs {', '.join(REQUIRED_FIELDS)} "
                               f"(answers a list); missing {', '.join(missing) or 'a list of answers'}")
        examples.append(Example(name, str(record.get("_id", number)), record["input"], record["context"],
                                [str(a) for a in record["answers"]], int(record["length"]), record.get("all_classes")))
    if not examples:
        raise RopekitError(f"{path}: no records")
    return examples


def build_prompt_ids(tokenizer, example: Example, window: int) -> list[int]:
    """Prompt token ids; longer than `window − max_new_tokens` → keep the first and last halves."""
    spec = DATASETS[example.dataset]
    ids = tokenizer(spec.template.format(context=example.context, input=example.input))["input_ids"]
    budget = window - spec.max_new_tokens
    if budget < 8:
        raise RopekitError(f"window {window} leaves no room for a {example.dataset} prompt")
    if len(ids) > budget:
        half = budget // 2
        ids = ids[:half] + ids[len(ids) - (budget - half):]
    return ids


def bucket_of(length: int) -> str:
    return next(name for name, lo, hi in BUCKETS if lo <= length < hi)


@dataclass
class LongBenchResult:
    window: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset → bucket → score (0–100)
    average: dict[str, float] = field(default_factory=dict)  # bucket → mean over datasets
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def run_longbench(model, tokenizer, examples: dict[str, list[Example]], *, window: int,
                  progress: bool = False, label: str = "") -> LongBenchResult:
    """Greedy-generate every example and score it; scores are ×100 as LongBench reports them."""
    result = LongBenchResult(window)
    items = [e for group in examples.values() for e in group]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"{label + ' · ' if label else ''}longbench-e", unit="example", leave=False)
    for ex in items:
        spec = DATASETS[ex.dataset]
        prediction = tokenizer.decode(generate_greedy(model, build_prompt_ids(tokenizer, ex, window), spec.max_new_tokens),
                                      skip_special_tokens=True)
        if spec.first_line_only:
            prediction = prediction.lstrip("\n").split("\n")[0]
        score = 100 * score_sample(spec.metric, prediction, ex.answers, ex.all_classes)
        result.rows.append({"dataset": ex.dataset, "id": ex.id, "bucket": bucket_of(ex.length), "metric": spec.metric,
                            "prediction": prediction, "score": score})
    for name in examples:
        per_bucket = {}
        for bucket, _, _ in BUCKETS:
            values = [r["score"] for r in result.rows if r["dataset"] == name and r["bucket"] == bucket]
            if values:
                per_bucket[bucket] = sum(values) / len(values)
        result.scores[name] = per_bucket
    for bucket, _, _ in BUCKETS:
        values = [s[bucket] for s in result.scores.values() if bucket in s]
        if values:
            result.average[bucket] = sum(values) / len(values)
    return result
