"""Tokenize JSONL corpora into Megatron indexed datasets: OUTPUT_PREFIX_{key}_document.bin/.idx.

Each JSON record becomes one document of one sequence per --json-keys key (as Megatron-LM's
tools/preprocess_data.py without --split-sentences), followed by the tokenizer's end-of-document id
with --append-eod. Inputs are .jsonl, .jsonl.gz and .jsonl.zst files, directories or globs.
With --sft each record is a conversation ({"messages": [...]} or {"prompt", "response"}), rendered
with the tokenizer's chat template into OUTPUT_PREFIX_sft_document.bin/.idx plus a uint8 loss mask
OUTPUT_PREFIX_sft_document_loss_mask.bin/.idx (1 on assistant replies; see megalign.data.sft).

Worker processes each tokenize a contiguous part of the input in batches and write a partial dataset;
the parts are merged in input order, so the output is byte-identical whatever --workers is. Plain
files are split into byte ranges at line starts that each worker reads itself. Nothing appears at the
output paths until the whole run has succeeded; a failed run leaves earlier outputs as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megalign.data.indexed_dataset import IndexedDatasetBuilder, best_token_dtype, data_file_path, index_file_path
from megalign.data.jsonl import BadRecordStats, expand_inputs
from megalign.data.preprocess_parallel import (
    MAX_EXAMPLES,
    Job,
    UnitResult,
    location_of,
    part_prefix,
    run_units,
)
from megalign.data.sft import LOSS_MASK_SUFFIX, SFT_KEY, check_chat_template, loss_mask_prefix
from megalign.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from megalign.errors import BadRecordError, ConfigError
from megalign.utils.progress import format_count, format_duration

EXAMPLES = """examples:
  # Megatron-style: one document per record, EOD after each, 8 worker processes
  megalign preprocess --input 'data/raw/*.jsonl.zst' --output-prefix data/corpus \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer/ --append-eod --workers 8
  #   -> data/corpus_text_document.bin / .idx

  # two fields of each record into two datasets, skipping (and counting) unusable lines
  python tools/preprocess_data.py --input aligned/ --json-keys text aligned_text \\
      --output-prefix data/aligned --tokenizer-type SentencePieceTokenizer \\
      --tokenizer-model tokenizer.model --append-eod --workers 4 --skip-bad-records

  # SFT conversations ({"messages": [...]} or {"prompt": ..., "response": ...} per line)
  megalign preprocess --sft --input sft.jsonl --output-prefix data/worker_sft \
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer/ --workers 4
  #   -> data/worker_sft_sft_document.{bin,idx} and data/worker_sft_sft_document_loss_mask.{bin,idx}
"""


@dataclass
class PreprocessSummary:
    """What a preprocess run wrote and how fast (also printed at the end of the command)."""

    outputs: Dict[str, str]
    files: int
    documents: int
    tokens: Dict[str, int]
    empty_documents: Dict[str, int]
    input_bytes: int
    seconds: float
    dtype: str
    skipped: BadRecordStats
    tokenizer: str = ""
    loss_mask_output: str = ""  # --sft: the loss-mask dataset prefix
    loss_tokens: int = 0  # --sft: tokens with loss mask 1 (assistant replies)

    def report(self) -> str:
        """Multi-line human-readable summary."""
        seconds = max(self.seconds, 1e-9)
        total_tokens = sum(self.tokens.values())
        what = "conversations" if self.loss_mask_output else "documents"
        lines = [
            f"preprocess: {self.documents:,} {what}, {format_count(total_tokens)} tokens from {self.files} "
            f"file{'s' if self.files != 1 else ''} ({self.input_bytes / 1e6:.2f} MB) in {format_duration(seconds)} "
            f"({seconds:.1f} s): {format_count(self.documents / seconds)} docs/s, "
            f"{format_count(total_tokens / seconds)} tokens/s, {self.input_bytes / 1e6 / seconds:.2f} MB/s",
        ]
        if self.tokenizer:
            lines.append(f"  tokenizer: {self.tokenizer}")
        for key, prefix in self.outputs.items():
            empty = f", {self.empty_documents[key]:,} empty" if self.empty_documents[key] else ""
            lines.append(f"  {key}: {prefix}.{{bin,idx}} ({self.tokens[key]:,} tokens, {self.dtype}{empty})")
        if self.loss_mask_output:
            share = self.loss_tokens / max(1, total_tokens)
            lines.append(
                f"  loss mask: {self.loss_mask_output}.{{bin,idx}} ({self.loss_tokens:,} tokens trained on, "
                f"{share:.1%}; uint8)"
            )
        lines.append(f"  {self.skipped.summary()}")
        lines += [f"    {example}" for example in self.skipped.examples]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "outputs": self.outputs,
            "files": self.files,
            "documents": self.documents,
            "tokens": self.tokens,
            "empty_documents": self.empty_documents,
            "input_bytes": self.input_bytes,
            "seconds": self.seconds,
            "dtype": self.dtype,
            "skipped": self.skipped.to_dict(),
            "tokenizer": self.tokenizer,
            "loss_mask_output": self.loss_mask_output,
            "loss_tokens": self.loss_tokens,
        }


def output_prefix_for(output_prefix: str, key: str) -> str:
    """The dataset prefix preprocess writes for one JSON key: OUTPUT_PREFIX_{key}_document."""
    return f"{output_prefix}_{key}_document"


def _check_arguments(
    output_prefix: str, json_keys: Optional[Sequence[str]], workers: int, sft: bool, append_eod: bool
) -> Tuple[str, ...]:
    """The JSON keys to tokenize (none with sft), after checking the flags."""
    if sft and json_keys is not None:
        raise ConfigError(
            "--json-keys cannot be used with --sft: SFT records hold 'messages' (or 'prompt' and "
            "'response'); drop --json-keys"
        )
    if sft and append_eod:
        raise ConfigError(
            "--append-eod cannot be used with --sft: the chat template's end-of-turn marker ends "
            "every reply; drop --append-eod"
        )
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not output_prefix or output_prefix.endswith(os.sep) or os.path.isdir(output_prefix):
        raise ConfigError(
            f"--output-prefix '{output_prefix}' must be a path prefix such as data/corpus (files "
            "data/corpus_text_document.bin/.idx are written), not a directory"
        )
    if sft:
        return ()
    keys = tuple(("text",) if json_keys is None else json_keys)
    if not keys:
        raise ConfigError("--json-keys needs at least one key")
    for key in keys:
        if not key or os.sep in key or key != key.strip():
            raise ConfigError(f"--json-keys: '{key}' cannot be used in an output file name")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--json-keys lists a key twice: {' '.join(keys)}")
    return keys


def _final_prefixes(output_prefix: str, job: Job) -> Dict[str, str]:
    """Part key -> the output dataset prefix it is merged into."""
    if job.sft:
        tokens = output_prefix_for(output_prefix, SFT_KEY)
        return {SFT_KEY: tokens, SFT_KEY + LOSS_MASK_SUFFIX: loss_mask_prefix(tokens)}
    return {key: output_prefix_for(output_prefix, key) for key in job.json_keys}


def _merge_and_commit(results: List[UnitResult], job: Job, output_prefix: str) -> Dict[str, str]:
    """Concatenate the partial datasets in unit order, then move every output into place.

    Returns part key -> output prefix.
    """
    work_dir = job.work_dir
    staged: Dict[str, str] = {}
    for key, dtype in job.part_dtypes().items():
        staged[key] = os.path.join(work_dir, f"merged_{key}_document")
        with IndexedDatasetBuilder(staged[key], dtype) as builder:
            for result in results:
                part = part_prefix(work_dir, result.index, key)
                builder.add_index(part)
                for path in (data_file_path(part), index_file_path(part)):
                    os.remove(path)  # free the space as soon as the part is copied
    outputs = _final_prefixes(output_prefix, job)
    for key, final in outputs.items():  # all staged: now replace; the .idx goes last so no mixed pair looks complete
        with contextlib.suppress(FileNotFoundError):
            os.remove(index_file_path(final))
        os.replace(data_file_path(staged[key]), data_file_path(final))
        os.replace(index_file_path(staged[key]), index_file_path(final))
    directory = os.open(os.path.dirname(os.path.abspath(output_prefix)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return outputs


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    *,
    vocab_size: Optional[int] = None,
    json_keys: Optional[Sequence[str]] = None,
    append_eod: bool = False,
    sft: bool = False,
    workers: int = 1,
    skip_bad_records: bool = False,
    log_interval: float = 5.0,
    chunk_bytes: Optional[int] = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize JSONL `inputs` (files, directories, globs) into OUTPUT_PREFIX_{key}_document.bin/.idx.

    json_keys defaults to ("text",). With `sft`, records are conversations and the outputs are
    OUTPUT_PREFIX_sft_document and OUTPUT_PREFIX_sft_document_loss_mask (json_keys and append_eod
    cannot be given: ConfigError).

    Raises BadRecordError ("FILE:LINE: ...") at the first unusable line unless `skip_bad_records`;
    on any failure the output paths are left as they were and the temporary files are removed.
    `chunk_bytes` overrides the size of the byte ranges plain files are split into.
    """
    started = time.monotonic()
    keys = _check_arguments(output_prefix, json_keys, workers, sft, append_eod)
    paths = expand_inputs(inputs)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab_size)
    if sft:
        check_chat_template(tokenizer)
    dtype = best_token_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_prefix)}.preprocess-", dir=out_dir)
    try:
        job = Job(
            tokenizer_type, tokenizer_model, vocab_size, keys, append_eod, skip_bad_records, work_dir, dtype.name, sft
        )
        results = run_units(job, paths, workers, chunk_bytes, log_interval, progress)
        outputs = _merge_and_commit(results, job, output_prefix)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    skipped = BadRecordStats()
    for result in results:
        for reason, count in result.bad_counts.items():
            skipped.counts[reason] = skipped.counts.get(reason, 0) + count
        for bad in result.bad_examples[: max(0, MAX_EXAMPLES - len(skipped.examples))]:
            skipped.examples.append(f"{location_of(bad)}: {bad.detail}")
    mask_output = outputs.pop(SFT_KEY + LOSS_MASK_SUFFIX, "")
    return PreprocessSummary(
        outputs=outputs,
        files=len(paths),
        documents=sum(result.documents for result in results),
        tokens={key: sum(result.tokens[key] for result in results) for key in outputs},
        empty_documents={key: sum(result.empty[key] for result in results) for key in outputs},
        input_bytes=sum(result.input_bytes for result in results),
        seconds=time.monotonic() - started,
        dtype=dtype.name,
        skipped=skipped,
        tokenizer=f"{tokenizer_type}, vocab {tokenizer.vocab_size}"
        + (" (exact byte-level BPE fast path)" if any(result.fast_path for result in results) else ""),
        loss_mask_output=mask_output,
        loss_tokens=sum(result.loss_tokens for result in results),
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's tools/preprocess_data.py flags (those whose concept megalign shares)."""
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), directories or quoted globs",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="keys of each record to tokenize; one dataset per key (default: text; not with --sft)",
    )
    group.add_argument(
        "--sft",
        action="store_true",
        help='records are conversations ({"messages": [{role, content}, ...]} or {"prompt", '
        '"response", "system"?}) rendered with the tokenizer\'s chat template; writes '
        "P_sft_document and its uint8 loss mask P_sft_document_loss_mask (1 on assistant replies)",
    )
    group.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip malformed lines, missing or non-string keys and invalid UTF-8, and count them "
        "in the summary (default: stop with FILE:LINE)",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        required=True,
        choices=TOKENIZER_TYPES,
        metavar="TYPE",
        help=f"one of {', '.join(TOKENIZER_TYPES)}",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        metavar="PATH",
        help="SentencePiece .model, tokenizer.json (or its folder), or .tiktoken / Megatron JSON",
    )
    group.add_argument(
        "--vocab-size", type=int, default=None, metavar="N", help="NullTokenizer only: ids 0..N-1, end-of-document id N"
    )
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id after every non-empty document"
    )
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-prefix",
        required=True,
        metavar="P",
        help="writes P_{key}_document.bin and P_{key}_document.idx for every --json-keys key "
        "(--sft: P_sft_document and P_sft_document_loss_mask)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes tokenizing in parallel (output does not depend on it; default 1)",
    )
    group.add_argument(
        "--log-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between progress lines (Megatron counts documents here; default 5)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `megalign preprocess` and print the summary."""
    try:
        summary = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            args.tokenizer_model,
            vocab_size=args.vocab_size,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            sft=args.sft,
            workers=args.workers,
            skip_bad_records=args.skip_bad_records,
            log_interval=args.log_interval,
        )
    except BadRecordError as error:
        if args.skip_bad_records:
            raise
        raise BadRecordError(f"{error} (pass --skip-bad-records to skip such lines and count them)") from None
    print(summary.report(), file=sys.stdout, flush=True)
    return 0


__all__ = ["EXAMPLES", "PreprocessSummary", "add_arguments", "main", "output_prefix_for", "preprocess"]
