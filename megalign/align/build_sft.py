"""Turn the expert's (original, rewritten) pairs into the SFT records the alignment worker is trained on.

Each annotated pair becomes ``{"id", "system", "prompt", "response"}``: the guideline's worker
instruction as the system message, the original document as the prompt and the expert's rewrite as the
response: the format `megalign preprocess --sft` tokenizes with the chat template (loss on the response
only). Pairs whose annotation failed are left out and counted. The output is one JSONL file, written
atomically; then:

  megalign preprocess --sft --input work/worker_sft.jsonl --output-prefix data/worker ...
  megalign train --sft --finetune --load CHAT_MODEL_CKPT --data-path data/worker_sft_document ...
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, Optional, Sequence

from megalign.align.records import StageInput
from megalign.errors import ConfigError
from megalign.utils.atomic import atomic_write

__all__ = ["ANNOTATED", "build_sft"]

EXAMPLES = """examples:
  megalign align build-sft --input work/pairs --output work/worker_sft.jsonl
  megalign align build-sft --input work/pairs --output work/worker_sft.jsonl --guidelines my_guidelines.yaml
"""

ANNOTATED = "annotated"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="the annotate stage's output directory (or JSONL)")
    parser.add_argument("--output", required=True, help="SFT JSONL file to write")
    parser.add_argument("--guidelines", default=None, help="polishing guidelines YAML (default: the packaged ones)")
    parser.add_argument("--skip-bad-records", action="store_true", help="skip malformed lines and count them")


def build_sft(
    inputs: Sequence[str], output: str, guidelines_path: Optional[str] = None, skip_bad_records: bool = False
) -> Dict[str, int]:
    """Write the SFT records of the annotated pairs in ``inputs`` to ``output``; returns counts."""
    from megalign.align.guidelines import load_guidelines

    guidelines = load_guidelines(guidelines_path)
    records = StageInput(list(inputs), skip_bad_records=skip_bad_records)
    counts = {"written": 0, "skipped_not_annotated": 0}
    with atomic_write(output) as handle:
        for record in records:
            if record.get("status") != ANNOTATED or not isinstance(record.get("rewritten"), str):
                counts["skipped_not_annotated"] += 1
                continue
            language = record.get("language") or guidelines.detect_language(record["text"])
            sft = guidelines.worker_sft_record(record["text"], record["rewritten"], language)
            handle.write(json.dumps({"id": record["id"], **sft}, ensure_ascii=False) + "\n")
            counts["written"] += 1
        if counts["written"] == 0:  # inside the block: nothing is written
            raise ConfigError(
                f"--input {' '.join(inputs)}: no annotated pairs (status '{ANNOTATED}') to build SFT "
                f"records from; {counts['skipped_not_annotated']} records were not annotated"
            )
    return counts


def main(args: argparse.Namespace) -> int:
    counts = build_sft(args.input, args.output, args.guidelines, args.skip_bad_records)
    print(
        f"build-sft: {counts['written']} SFT records -> {args.output} ({counts['skipped_not_annotated']} pairs "
        "left out: not annotated)"
    )
    print(
        f"next: megalign preprocess --sft --input {args.output} --output-prefix PREFIX --tokenizer-type ... "
        "--tokenizer-model ..."
    )
    return 0
