"""Rewrite the corpus with the alignment worker (the paper's step 4), validating every rewrite.

The worker runs in this process (--load CHECKPOINT or --hf-dir DIR, with the shared model flags of
megalign/inference/model_flags.py: KV-cache batched generation) or on one or more OpenAI-compatible
servers (--base-url URL ... --model NAME: vLLM, TGI, `megalign serve`), with the same retry rules as
annotate. Each document is split at paragraph boundaries into pieces that fit the worker's context
(--max-piece-tokens, derived from the model in process; --max-piece-chars for servers),
each piece is rewritten with the guideline's worker prompt in the document's language, checked
(empty, truncated, wrong script, length ratio, meta-text, refusal, lost numbers or names), and the pieces
are joined back with the original paragraph breaks. Every input record ends in the output exactly once:

  status "rewritten":     ``aligned_text`` is the worker's rewrite;
  status "kept_original": a piece failed (or the text is blank: reason no_text) and --on-invalid
                          keep-original (default): ``aligned_text`` is the original text; ``reason``
                          says which piece failed and why;
  status "dropped":       the same with --on-invalid drop: no ``aligned_text``,

plus ``worker``, ``guideline_version`` and token ``usage``. Shard the corpus over processes or machines
with --shard-index/--num-shards; a rerun resumes where a killed run stopped (see stage_output.py).
Train on the result with `megalign preprocess --json-keys aligned_text --skip-bad-records` (dropped
records have no aligned_text and are counted as skipped).
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from megalign.align.chunking import Piece, join_rewrites, split_document
from megalign.align.cli import add_io_arguments
from megalign.align.openai_client import add_client_arguments, config_from_args
from megalign.align.records import Record, StageInput
from megalign.align.rewrite_backends import LocalBackend, PieceRequest, PieceResult, ServerBackend
from megalign.align.stage_output import ShardOutput
from megalign.errors import ConfigError
from megalign.inference.model_flags import MODEL_FLAGS, add_model_arguments, load_model_from_args, model_given
from megalign.utils.progress import ProgressMeter

__all__ = ["DROPPED", "KEPT_ORIGINAL", "REWRITTEN", "Rewriter", "run_rewrite"]

EXAMPLES = """examples:
  megalign align rewrite --input work/unique --output work/aligned --load worker_ckpt --batch-size 16
  megalign align rewrite --input work/unique --output work/aligned --hf-dir worker_hf --device cuda --dtype bf16
  megalign align rewrite --input work/unique --output work/aligned --base-url http://gpu1:8000/v1 \\
      http://gpu2:8000/v1 --model worker --concurrency 64 --shard-index 0 --num-shards 4
"""

REWRITTEN, KEPT_ORIGINAL, DROPPED = "rewritten", "kept_original", "dropped"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser)
    parser.add_argument("--guidelines", default=None, help="polishing guidelines YAML (default: the packaged ones)")
    parser.add_argument(
        "--on-invalid",
        choices=("keep-original", "drop"),
        default="keep-original",
        help="what to do with a document whose rewrite fails validation (default keep-original)",
    )
    local = add_model_arguments(
        parser,
        title="in-process worker (--load CHECKPOINT or --hf-dir DIR)",
        batch_size_help="pieces generated together",
    )
    local.add_argument(
        "--max-new-tokens-ratio",
        type=float,
        default=1.5,
        help="a rewrite may have at most ceil(RATIO x piece tokens) + 16 tokens (default 1.5)",
    )
    local.add_argument(
        "--max-piece-tokens",
        type=int,
        default=None,
        help="largest piece in tokens (default: what fits the model with the ratio)",
    )
    local.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    parser.add_argument(
        "--max-piece-chars",
        type=int,
        default=6000,
        help="largest piece in characters when the worker is a server (default 6000)",
    )
    add_client_arguments(parser, required=False, default_concurrency=16)


@dataclass
class _Document:
    record: Record
    language: str
    pieces: List[Piece]
    rewrites: Dict[int, PieceResult] = field(default_factory=dict)

    @property
    def todo(self) -> List[int]:
        return [i for i, (text, _) in enumerate(self.pieces) if text.strip()]


class Rewriter:
    """Splits records into worker requests and assembles, validates and writes the finished records."""

    def __init__(
        self,
        backend: Any,
        out: ShardOutput,
        guidelines: Any,
        validation: Any,
        max_piece: int,
        count: Callable[[str], int],
        meter: Optional[ProgressMeter] = None,
    ) -> None:
        self.backend, self.out, self.guidelines, self.validation = backend, out, guidelines, validation
        self.max_piece, self.count = max_piece, count
        self.meter = meter or ProgressMeter("rewrite", enabled=False)
        self.open: Dict[str, _Document] = {}
        self.lock = threading.Lock()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "pieces": 0}

    def requests(self, records: Iterator[Record]) -> Iterator[PieceRequest]:
        """The piece requests of the records not yet in the output (a record without text to rewrite is
        finished at once)."""
        for record in records:
            if self.out.is_done(record["id"]):
                continue
            language = record.get("language") or self.guidelines.detect_language(record["text"])
            document = _Document(record, language, split_document(record["text"], self.max_piece, self.count))
            if not document.todo:
                self._finish(document)
                continue
            self.open[record["id"]] = document
            for index in document.todo:
                yield PieceRequest(
                    (record["id"], index), self.guidelines.worker_messages(document.pieces[index][0], language)
                )

    def on_result(self, result: PieceResult) -> None:
        """Record a piece's result; write the document when all its pieces are in."""
        rid, index = result.key
        document = self.open[rid]
        document.rewrites[index] = result
        self.usage["pieces"] += 1
        self.usage["prompt_tokens"] += result.prompt_tokens
        self.usage["completion_tokens"] += result.completion_tokens
        if len(document.rewrites) == len(document.todo):
            del self.open[rid]
            self._finish(document)

    def check_piece(
        self, original: str, text: Optional[str], language: str, finish_reason: Optional[str]
    ) -> Optional[str]:
        """The validation failure reason of one piece's rewrite, or None."""
        from megalign.align.validation import validate_rewrite

        return validate_rewrite(original, text, language, self.validation, finish_reason).reason

    def validate_piece(self, key: Any, text: str) -> Optional[str]:
        """The validation failure reason of a reply to piece ``key`` = (record id, piece index), or None."""
        document = self.open[key[0]]
        return self.check_piece(document.pieces[key[1]][0], text, document.language, None)

    def _finish(self, document: _Document) -> None:
        record, todo = document.record, document.todo
        failure = None if todo else "no_text"  # nothing but whitespace: there is nothing to rewrite
        for position, index in enumerate(todo):
            result = document.rewrites[index]
            why = result.reason or self.check_piece(
                document.pieces[index][0], result.text, document.language, result.finish_reason
            )
            if why:
                failure = why if len(todo) == 1 else f"piece {position + 1}/{len(todo)}: {why}"
                break
        record.update(
            {
                "language": document.language,
                "worker": self.backend.name,
                "guideline_version": self.guidelines.version,
                "pieces": len(todo),
                "usage": {
                    "prompt_tokens": sum(r.prompt_tokens for r in document.rewrites.values()),
                    "completion_tokens": sum(r.completion_tokens for r in document.rewrites.values()),
                },
            }
        )
        if failure is None:
            rewrites = [
                (document.rewrites[i].text or "") if i in document.rewrites else "" for i in range(len(document.pieces))
            ]
            record.update(
                {"status": REWRITTEN, "reason": None, "aligned_text": join_rewrites(document.pieces, rewrites)}
            )
        elif self.validation.policy == "drop":
            record.update({"status": DROPPED, "reason": failure})
        else:
            record.update({"status": KEPT_ORIGINAL, "reason": failure, "aligned_text": record["text"]})
        self.out.write(record)
        self.meter.update(docs=1, pieces=len(todo))


def _make_backend(args: argparse.Namespace) -> Any:
    if model_given(args) == bool(args.base_url):
        raise ConfigError(
            f"give the worker either as {MODEL_FLAGS} (in-process) or as --base-url URL ... "
            "--model NAME (servers), not both and not neither"
        )
    if model_given(args):
        return LocalBackend(
            load_model_from_args(args),
            batch_size=args.batch_size,
            max_new_tokens_ratio=args.max_new_tokens_ratio,
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    if not args.model:
        raise ConfigError("--base-url needs --model NAME (the model the servers serve)")
    return ServerBackend(config_from_args(args))


def run_rewrite(
    inputs: Sequence[str],
    output: str,
    backend: Any,
    guidelines_path: Optional[str] = None,
    on_invalid: str = "keep-original",
    shard_index: int = 0,
    num_shards: int = 1,
    max_piece: Optional[int] = None,
    skip_bad_records: bool = False,
    settings: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Rewrite one shard of ``inputs`` into ``output`` with ``backend`` (Local/ServerBackend); returns the shard
    summary. ``max_piece``: tokens (local) or characters (servers) per piece."""
    from megalign.align.guidelines import load_guidelines
    from megalign.align.validation import ValidationConfig

    guidelines = load_guidelines(guidelines_path)
    validation = ValidationConfig(scripts=guidelines.scripts, policy=on_invalid.replace("-", "_"))
    local = isinstance(backend, LocalBackend)
    if max_piece is None:  # what fits after the longest worker prompt of any language
        max_piece = (
            min(backend.max_piece_tokens(guidelines.worker_messages("", code)) for code in guidelines.languages)
            if local
            else 6000
        )
    count = backend.count_tokens if local else len
    records = StageInput(list(inputs), shard_index, num_shards, skip_bad_records)
    settings = {
        "worker": backend.name,
        "guideline_version": guidelines.version,
        "on_invalid": on_invalid,
        "max_piece": max_piece,
        **(settings or {}),
    }
    with ShardOutput(output, "rewrite", shard_index, num_shards, settings) as out:
        if out.already_finished:
            print(f"rewrite: shard {shard_index} of {num_shards} is already finished in {output}")
            return out.finish()
        meter = ProgressMeter("rewrite", total=max(records.count() - len(out.done_ids), 0), unit="docs")
        rewriter = Rewriter(backend, out, guidelines, validation, max_piece, count, meter)
        usage = backend.run(rewriter.requests(iter(records)), rewriter.on_result, rewriter.validate_piece)
        meter.close()
        if rewriter.open:  # every piece was answered, so this would be a bug: leave them for a rerun
            raise RuntimeError(f"rewrite: {len(rewriter.open)} documents did not get all their pieces")
        return out.finish({"worker_usage": usage, "resumed": out.resumed, "bad_records": records.stats.to_dict()})


def main(args: argparse.Namespace) -> int:
    backend = _make_backend(args)
    local = model_given(args)
    settings = {"temperature": args.temperature, "top_p": args.top_p}
    if local:
        settings.update(
            {
                "max_new_tokens_ratio": args.max_new_tokens_ratio,
                "max_tokens": args.max_tokens,
                "seed": args.seed,
                "dtype": args.dtype,
            }
        )
        if args.ckpt_step is not None:
            settings["ckpt_step"] = args.ckpt_step
    else:
        settings["max_tokens"] = args.max_tokens
    max_piece = args.max_piece_tokens if local else args.max_piece_chars
    summary = run_rewrite(
        args.input,
        args.output,
        backend,
        args.guidelines,
        args.on_invalid,
        args.shard_index,
        args.num_shards,
        max_piece,
        args.skip_bad_records,
        settings,
    )
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(summary["statuses"].items()))
    print(f"rewrite: {summary['records']} records ({statuses}) -> {args.output}")
    return 0
