"""The quality report: the original corpus against its aligned rewrite (JSON + Markdown + PNG).

For each side it measures documents, characters, words, URLs, e-mail addresses, phone numbers and
ad/spam markers, a toxicity score per category (the packaged Arabic/English lexicons, or any classifier
via --toxicity-classifier MODULE:FUNCTION returning {category: score in [0, 1]}) and, with a reference
model (--load CHECKPOINT or --hf-dir DIR, with the shared model flags --device, --dtype, --batch-size of
megalign/inference/model_flags.py), the perplexity of every document under it (histogram PNG, as the
paper's figure). It also reports tokens per document (that model's tokenizer), the rewrite statuses and
validation reasons, and how much knowledge the rewrites kept (share of the original's numbers and names
found in the rewrite).

The aligned side is the rewrite stage's output (``aligned_text``; dropped documents have none). The
original side is the ``text`` those records carry, or --original (files or a directory) matched by id.
--max-docs caps the documents read (the first ones in file order); --ppl-docs caps those scored.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megalign.align import text_signals as ts
from megalign.align.records import StageInput
from megalign.errors import ConfigError
from megalign.inference.model_flags import add_model_arguments, load_model_from_args, model_label
from megalign.utils.atomic import atomic_write, write_json_atomic
from megalign.utils.progress import ProgressMeter

__all__ = ["build_report", "corpus_statistics", "render_markdown"]

EXAMPLES = """examples:
  megalign align report --aligned work/aligned --output work/report
  megalign align report --aligned work/aligned --original work/unique --output work/report --load ckpt/llama3-8b \\
      --ppl-docs 2000 --device cuda --dtype bf16
  megalign align report --aligned work/aligned --output work/report --hf-dir Meta-Llama-3-8B --device cuda --dtype bf16
"""

_PIECE = re.compile(r"^piece \d+/\d+: ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aligned", nargs="+", required=True, help="the rewrite stage's output (directory or JSONL)")
    parser.add_argument(
        "--original",
        nargs="+",
        default=None,
        help="original records matched by id (default: the 'text' the aligned records carry)",
    )
    parser.add_argument("--output", required=True, help="directory for report.json, report.md and the PNGs")
    add_model_arguments(
        parser,
        title="reference model for perplexity and tokens (optional: --load or --hf-dir)",
        batch_size=None,
        batch_size_help="full-length windows per scoring forward pass (default: as many as fit 4096 tokens)",
    )
    parser.add_argument("--max-docs", type=int, default=None, help="read at most this many aligned records")
    parser.add_argument("--ppl-docs", type=int, default=2000, help="score at most this many documents (default 2000)")
    parser.add_argument(
        "--toxicity-classifier",
        default=None,
        help="MODULE:FUNCTION, a callable text -> {category: score} used instead of the lexicons",
    )
    parser.add_argument("--lexicon-dir", default=None, help="directory of user lexicons LANG.yaml")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")


def _summary(values: Sequence[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"mean": None, "median": None, "p10": None, "p90": None}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p10": ordered[int(0.1 * (len(ordered) - 1))],
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
    }


def corpus_statistics(
    texts: Sequence[str], languages: Sequence[str], scorer: Any, spam_markers: Callable[[str], Sequence[str]]
) -> Dict[str, Any]:
    """Length, contact-detail, spam and toxicity statistics of ``texts`` (``languages`` per text)."""
    from megalign.align.toxicity import aggregate_scores

    chars = [len(t) for t in texts]
    words = [len(ts.words(t)) for t in texts]
    counts: Counter[str] = Counter()
    toxicity = []
    for text, language in zip(texts, languages):
        counts["urls"] += len(ts.find_urls(text))
        counts["emails"] += len(ts.find_emails(text))
        counts["phone_numbers"] += len(ts.find_phone_numbers(text))
        counts["spam_markers"] += len(ts.find_spam_markers(text, spam_markers(language)))
        toxicity.append(scorer.score(text, language))
    return {
        "documents": len(texts),
        "characters": sum(chars),
        "words": sum(words),
        "characters_per_document": _summary(chars),
        "words_per_document": _summary(words),
        "counts": dict(counts),
        "toxicity": aggregate_scores(toxicity),
    }


def _toxicity_scorer(spec: Optional[str], lexicon_dir: Optional[str]) -> Any:
    from megalign.align.toxicity import ClassifierScorer, LexiconToxicityScorer

    if spec is None:
        return LexiconToxicityScorer(lexicon_dir=lexicon_dir)
    module_name, _, attribute = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"--toxicity-classifier {spec!r}: cannot import it ({exc}); expected MODULE:FUNCTION"
        ) from None
    return ClassifierScorer(fn)


def _read_pairs(
    aligned: Sequence[str], original: Optional[Sequence[str]], max_docs: Optional[int]
) -> List[Dict[str, Any]]:
    records = []
    for record in StageInput(list(aligned)):
        if "status" not in record:
            raise ConfigError(
                f"--aligned {' '.join(aligned)}: record {record['id']!r} has no 'status'; pass the "
                "output of `megalign align rewrite`"
            )
        records.append(record)
        if max_docs is not None and len(records) >= max_docs:
            break
    if original:
        wanted = {r["id"] for r in records}
        texts = {r["id"]: r["text"] for r in StageInput(list(original)) if r["id"] in wanted}
        missing = [r["id"] for r in records if r["id"] not in texts]
        if missing:
            raise ConfigError(
                f"--original {' '.join(original)}: has no record with id {missing[0]!r} "
                f"(+{len(missing) - 1} more) that --aligned has"
            )
        for record in records:
            record["text"] = texts[record["id"]]
    return records


def _knowledge(records: List[Dict[str, Any]], lexicons: Dict[str, Any]) -> Dict[str, Any]:
    from megalign.align.validation import knowledge_preservation

    number_shares, entity_shares = [], []
    for record in records:
        if record["status"] != "rewritten":
            continue
        kept = knowledge_preservation(record["text"], record["aligned_text"], lexicons.get(record["_language"]))
        if kept["number_share"] is not None:
            number_shares.append(kept["number_share"])
        if kept["entity_share"] is not None:
            entity_shares.append(kept["entity_share"])
    return {
        "rewritten_documents": sum(r["status"] == "rewritten" for r in records),
        "documents_with_numbers": len(number_shares),
        "number_share": _summary(number_shares),
        "documents_with_entities": len(entity_shares),
        "entity_share": _summary(entity_shares),
    }


def _perplexities(
    reference: Any, texts: Dict[str, List[str]], batch_size: Optional[int]
) -> Dict[str, Tuple[List[float], List[int]]]:
    """Per side: (perplexities of the scorable documents, predicted tokens of every document) under
    ``reference`` (a LoadedModel), ``batch_size`` full-length windows per forward pass (None: 4096 tokens)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"--batch-size {batch_size!r} must be a positive integer")
    scorer = (
        reference.scorer() if batch_size is None else reference.scorer(batch_tokens=batch_size * reference.max_length)
    )
    out = {}
    for side, values in texts.items():
        scores = scorer.score(values, progress=True)
        out[side] = ([s.ppl for s in scores if s.ppl is not None], [s.tokens for s in scores])
    return out


def build_report(
    aligned: Sequence[str],
    output: str,
    original: Optional[Sequence[str]] = None,
    load: Optional[str] = None,
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    max_docs: Optional[int] = None,
    ppl_docs: int = 2000,
    toxicity_classifier: Optional[str] = None,
    lexicon_dir: Optional[str] = None,
    plots: bool = True,
    reference: Any = None,
    dtype: str = "fp32",
    device: str = "cpu",
    batch_size: Optional[int] = None,
) -> Dict[str, Any]:
    """Compute the report, write report.json / report.md (/ PNGs) into ``output`` and return it.

    The reference model for perplexity and tokens is ``reference`` (a loaded
    :class:`~megalign.inference.model_loading.LoadedModel`; ``load`` then only names it in the report), else
    the checkpoint ``load`` loaded as ``dtype`` on ``device`` with the given tokenizer, else none."""
    records = _read_pairs(aligned, original, max_docs)
    if not records:
        raise ConfigError(f"--aligned {' '.join(aligned)}: no records to report on")
    scripts = dict(ts.DEFAULT_LANGUAGE_SCRIPTS)
    for record in records:
        record["_language"] = record.get("language") or ts.detect_language(record["text"], scripts, "en")
    lexicons = {code: ts.load_lexicon(code, lexicon_dir) for code in {r["_language"] for r in records}}
    scorer = _toxicity_scorer(toxicity_classifier, lexicon_dir)
    meter = ProgressMeter("report", total=2, unit="sides")
    sides: Dict[str, Tuple[List[str], List[str]]] = {
        "original": ([r["text"] for r in records], [r["_language"] for r in records]),
        "aligned": (
            [r["aligned_text"] for r in records if isinstance(r.get("aligned_text"), str)],
            [r["_language"] for r in records if isinstance(r.get("aligned_text"), str)],
        ),
    }
    report: Dict[str, Any] = {"documents": len(records)}
    for side, (texts, languages) in sides.items():
        report[side] = corpus_statistics(texts, languages, scorer, lambda code: lexicons[code].spam)
        meter.update(sides=1)
    meter.close()
    reasons = Counter(_PIECE.sub("", r["reason"]) for r in records if r.get("reason"))
    report["statuses"] = dict(Counter(r["status"] for r in records))
    report["validation_reasons"] = dict(reasons.most_common())
    report["knowledge_preservation"] = _knowledge(records, lexicons)
    report["removed"] = {
        name: report["original"]["counts"].get(name, 0) - report["aligned"]["counts"].get(name, 0)
        for name in ("urls", "emails", "phone_numbers", "spam_markers")
    }
    report["examples"] = [
        {"id": r["id"], "original": r["text"][:400], "aligned": r["aligned_text"][:400]}
        for r in records
        if r["status"] == "rewritten"
    ][:3]
    figures: Dict[str, str] = {}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if reference is None and load:
        from megalign.inference.model_loading import load_model

        reference = load_model(
            load, dtype=dtype, device=device, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model
        )
    if reference is not None:
        load = str(load or reference.path)
        scored = records[:ppl_docs]
        ppl = _perplexities(
            reference,
            {
                "original": [r["text"] for r in scored],
                "aligned": [r["aligned_text"] for r in scored if isinstance(r.get("aligned_text"), str)],
            },
            batch_size,
        )
        report["perplexity"] = {
            "reference": str(load),
            "dtype": _dtype_name(reference),
            **{side: {"documents": len(v), **_summary(v)} for side, (v, _) in ppl.items()},
        }
        report["tokens"] = {
            "tokenizer_of": str(load),
            **{
                side: {"documents": len(t), "tokens": sum(t), "per_document": _summary(t)}
                for side, (_, t) in ppl.items()
            },
        }
        if plots:
            from megalign.align.report_plots import histogram_png

            figures["perplexity"] = histogram_png(
                out / "perplexity.png",
                ppl["original"][0],
                ppl["aligned"][0],
                "Perplexity per document",
                "perplexity",
                log_x=True,
            ).name
    if plots:
        from megalign.align.report_plots import histogram_png

        figures["length"] = histogram_png(
            out / "length.png",
            [len(t) for t in sides["original"][0]],
            [len(t) for t in sides["aligned"][0]],
            "Document length",
            "characters",
        ).name
    report["figures"] = figures
    write_json_atomic(out / "report.json", report)
    with atomic_write(out / "report.md") as handle:
        handle.write(render_markdown(report))
    return report


def _dtype_name(reference: Any) -> str:
    """The --dtype name of ``reference``'s weights (fp32, bf16, fp16)."""
    dtype = str(next(reference.model.parameters()).dtype)
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(dtype, dtype)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown tables (original vs aligned)."""
    o, a = report["original"], report["aligned"]
    rows = [
        ("documents", o["documents"], a["documents"]),
        ("characters", o["characters"], a["characters"]),
        ("words", o["words"], a["words"]),
        (
            "median characters / document",
            o["characters_per_document"]["median"],
            a["characters_per_document"]["median"],
        ),
    ]
    rows += [
        (name.replace("_", " "), o["counts"].get(name, 0), a["counts"].get(name, 0))
        for name in ("urls", "emails", "phone_numbers", "spam_markers")
    ]
    rows.append(("toxicity: flagged documents", o["toxicity"]["flagged"], a["toxicity"]["flagged"]))
    for category, value in o["toxicity"]["mean_per_1000_words"].items():
        rows.append((f"toxicity: {category} per 1000 words", value, a["toxicity"]["mean_per_1000_words"].get(category)))
    if "tokens" in report:
        rows.append(
            ("tokens (scored documents)", report["tokens"]["original"]["tokens"], report["tokens"]["aligned"]["tokens"])
        )
    if "perplexity" in report:
        for key in ("median", "mean"):
            rows.append(
                (f"perplexity ({key})", report["perplexity"]["original"][key], report["perplexity"]["aligned"][key])
            )
    lines = [
        "# Native-alignment quality report",
        "",
        f"{report['documents']:,} documents. Statuses: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(report["statuses"].items()))
        + ".",
        "",
        "| measure | original | aligned |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {_cell(x)} | {_cell(y)} |" for name, x, y in rows]
    kept = report["knowledge_preservation"]
    lines += [
        "",
        "## Knowledge preservation (rewritten documents)",
        "",
        f"- numbers kept: median share {_cell(kept['number_share']['median'])} over "
        f"{kept['documents_with_numbers']} documents with numbers",
        f"- names kept: median share {_cell(kept['entity_share']['median'])} over "
        f"{kept['documents_with_entities']} documents with names",
        "",
        "## Validation reasons",
        "",
    ]
    lines += [f"- {reason}: {count:,}" for reason, count in report["validation_reasons"].items()] or ["- none"]
    for name, path in report["figures"].items():
        lines += ["", f"![{name}]({path})"]
    if report["examples"]:
        lines += ["", "## Examples"]
        for example in report["examples"]:
            lines += [
                "",
                f"**{example['id']}** original:",
                "",
                "> " + example["original"].replace("\n", " "),
                "",
                "aligned:",
                "",
                "> " + example["aligned"].replace("\n", " "),
            ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    label, reference = model_label(args), None
    if label is not None:
        reference = load_model_from_args(args)
    report = build_report(
        args.aligned,
        args.output,
        args.original,
        label,
        args.tokenizer_type,
        args.tokenizer_model,
        args.max_docs,
        args.ppl_docs,
        args.toxicity_classifier,
        args.lexicon_dir,
        not args.no_plots,
        reference=reference,
        batch_size=args.batch_size,
    )
    print(
        f"report: {report['documents']} documents -> {Path(args.output) / 'report.md'} "
        f"(+ report.json{''.join(', ' + f for f in report['figures'].values())})"
    )
    print(json.dumps({"statuses": report["statuses"], "removed": report["removed"]}, ensure_ascii=False))
    return 0
