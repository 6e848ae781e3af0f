"""The native-alignment part of `megalign demo`: the paper's four steps and the quality report on the sample.

No LLM API is reachable here, so a rule-based stand-in plays the expert over the real OpenAI-compatible
HTTP path (megalign/align/rule_based_expert.py). The worker is a tiny model fine-tuned for a few steps:
its rewrites mostly fail validation and keep the original, which the report shows. The demo shows how the
pipeline works, not how good the output is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Sequence

from megalign.errors import MegalignError

__all__ = ["expert_annotation", "plant_duplicates", "quality_report", "rewrite_corpus"]

Run = Callable[[str, Sequence[str]], None]


def plant_duplicates(corpus: Path, output: Path, every: int = 20) -> int:
    """Copy ``corpus`` to ``output`` plus, for every ``every``-th record, an exact copy with tatweel added and a
    near copy with its last words changed (what web crawls are full of); returns the records planted."""
    from megalign.data.jsonl import iter_records
    from megalign.utils.atomic import atomic_write

    lines, planted = [], 0
    for index, (_, record) in enumerate(iter_records(str(corpus), ("text",))):
        lines.append(json.dumps({**record, "id": f"doc{index}"}, ensure_ascii=False))
        if index % every == 0:
            text = record["text"]
            words = text.split()
            lines.append(json.dumps({"id": f"doc{index}-copy", "text": text.replace("ا", "ـا", 3)}, ensure_ascii=False))
            near = " ".join(words[:-2] + ["(updated)"]) if len(words) > 30 else text + " ."
            lines.append(json.dumps({"id": f"doc{index}-near", "text": near}, ensure_ascii=False))
            planted += 2
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"{output}: {len(lines)} records ({planted} planted duplicates)")
    return planted


def expert_annotation(run: Run, work: Path, corpus: Path, reference: Path) -> Path:
    """dedup -> seed (perplexity-stratified under ``reference``) -> annotate (stand-in expert) -> build-sft;
    returns the SFT JSONL for the worker."""
    from megalign.align.rule_based_expert import RuleBasedExpertServer

    plant_duplicates(corpus, work / "raw.jsonl")
    run("align", ["dedup", "--input", str(work / "raw.jsonl"), "--output", str(work / "unique")])
    report = json.loads((work / "unique" / "dedup_report.json").read_text(encoding="utf-8"))
    print(
        f"dedup: kept {report['kept_records']} of {report['input_records']} records "
        f"({report['exact_duplicates']['removed']} exact, {report['near_duplicates']['removed']} near duplicates)"
    )
    run(
        "align",
        [
            "seed",
            "--input",
            str(work / "unique"),
            "--output",
            str(work / "seed"),
            "--num",
            "96",
            "--strategy",
            "ppl-stratified",
            "--load",
            str(reference),
            "--candidates",
            "192",
        ],
    )
    with RuleBasedExpertServer() as expert:
        print(f"stand-in expert (rule-based, OpenAI-compatible) at {expert.base_url}")
        run(
            "align",
            [
                "annotate",
                "--input",
                str(work / "seed"),
                "--output",
                str(work / "pairs"),
                "--base-url",
                expert.base_url,
                "--model",
                expert.model_name,
                "--api-key-env",
                "MEGALIGN_DEMO_NO_KEY",
            ],
        )
    run("align", ["build-sft", "--input", str(work / "pairs"), "--output", str(work / "worker_sft.jsonl")])
    return work / "worker_sft.jsonl"


def _start_server(worker: Path) -> tuple:
    """`megalign serve WORKER --port 0` in a subprocess; returns (process, base URL) once it listens."""
    command = [sys.executable, "-m", "megalign.cli", "serve", str(worker), "--port", "0", "--model-name", "worker"]
    print("$ megalign serve " + f"{worker} --port 0 --model-name worker &", flush=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    assert process.stdout is not None  # stdout=PIPE
    for line in process.stdout:
        print(line.rstrip(), flush=True)
        if " at http://" in line:
            return process, line.split(" at ")[-1].split()[0]
    process.wait()
    raise MegalignError("demo: `megalign serve` exited before listening")


def rewrite_corpus(run: Run, work: Path, worker: Path) -> List[Path]:
    """Rewrite shard 0 of 8 in-process and shard 1 of 8 through `megalign serve` with the worker, and shard 2
    of 8 through the rule-based stand-in (what a well-trained worker would remove); returns the parts."""
    from megalign.align.rule_based_expert import RuleBasedExpertServer

    aligned = work / "aligned"
    if aligned.exists():
        shutil.rmtree(aligned)
    common = ["--input", str(work / "unique"), "--output", str(aligned), "--num-shards", "8"]
    run("align", ["rewrite", *common, "--shard-index", "0", "--load", str(worker), "--batch-size", "16"])
    process, url = _start_server(worker)
    try:
        run(
            "align",
            [
                "rewrite",
                *common,
                "--shard-index",
                "1",
                "--base-url",
                url,
                "--model",
                "worker",
                "--concurrency",
                "8",
                "--max-piece-chars",
                "300",
                "--max-tokens",
                "160",
                "--api-key-env",
                "MEGALIGN_DEMO_NO_KEY",
            ],
        )
    finally:
        process.terminate()
        process.wait()
    with RuleBasedExpertServer() as stand_in:
        print(f"shard 2 through the rule-based stand-in at {stand_in.base_url}, to show the report with changes")
        run(
            "align",
            [
                "rewrite",
                *common,
                "--shard-index",
                "2",
                "--base-url",
                stand_in.base_url,
                "--model",
                stand_in.model_name,
                "--api-key-env",
                "MEGALIGN_DEMO_NO_KEY",
            ],
        )
    return [aligned / f"part-0000{i}-of-00008.jsonl" for i in range(3)]


def quality_report(run: Run, work: Path, parts: List[Path], reference: Path) -> None:
    """`megalign align report` on the rewritten parts, with perplexity under ``reference``."""
    import importlib.util

    plots = [] if importlib.util.find_spec("matplotlib") else ["--no-plots"]
    run(
        "align",
        ["report", "--aligned", *map(str, parts), "--output", str(work / "report"), "--load", str(reference), *plots],
    )
    lines = (work / "report" / "report.md").read_text(encoding="utf-8").splitlines()
    print("\n".join(lines[:24]))
