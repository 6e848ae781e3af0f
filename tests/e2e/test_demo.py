"""`megalign demo` as a user runs it (the `make demo` path), on the shipped sample."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path, repo_root: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "megalign.cli", "demo", "--workdir", str(workdir)],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for step in ("1. Train a tokenizer", "2. Split the corpus", "3. Merge", "4. Blended GPT datasets",
                 "5. Train the tiny", "6. Resume", "resumed at step 60", "training finished at step 120",
                 "7. Parallel training", "layout TP 2, PP 2, DP 1, sequence parallel",
                 "training finished at step 20", "loaded weights from", "training finished at step 30",
                 "8. Native alignment", "dedup: kept", "seed: chose 96 documents (ppl-stratified)", "annotate: 96 records",
                 "build-sft:", "loaded weights from", "training finished at step 40",
                 "9. Rewrite the corpus", "serving ", "rewrite: 46 records (46 rewritten)",
                 "10. Quality report", "| urls |",
                 "11. Export the TP 2 x PP 2 checkpoint", "transformers LlamaForCausalLM: loss",
                 "megalign --hf-dir hf_export: largest logit difference",
                 "12. Megatron-LM's own Llama-3 launch flags", "refused at start: --fp8-format hybrid",
                 "megatron_checkpoints: no checkpoint there yet; training starts from scratch",
                 "vocabulary of 128257 padded to 128512 rows", "layout TP 4, PP 1, DP 1, sequence parallel",
                 "the checkpoint's vocabulary of 128257 padded to 128384 rows", "resumed at step 6 (48 samples consumed)",
                 "training finished at step 8 (64 samples)",
                 "demo finished"):
        assert step in out
    assert (workdir / "tokenizer" / "tokenizer.model").is_file()
    for name in ("arabic_text_document", "english_text_document", "all_text_document"):
        assert (workdir / "data" / f"{name}.bin").is_file() and (workdir / "data" / f"{name}.idx").is_file()
    assert "train[0]: 128 tokens" in out
    assert (workdir / "checkpoints" / "iter_0000120" / "metadata.json").is_file()
    assert (workdir / "worker_checkpoints" / "iter_0000040" / "metadata.json").is_file()
    assert (workdir / "parallel_checkpoints" / "iter_0000030" / "metadata.json").is_file()
    assert out.count("training finished at step 20") == 1  # only the logging rank of the parallel job prints
    assert "recompute selective" in out
    report = json.loads((workdir / "align" / "report" / "report.json").read_text())
    assert report["documents"] == sum(1 for i in range(3) for _ in
                                      open(workdir / "align" / "aligned" / f"part-0000{i}-of-00008.jsonl"))
    assert report["removed"]["urls"] > 0 and report["statuses"]["rewritten"] == 46
    assert (workdir / "hf_export" / "config.json").is_file() and (workdir / "hf_export" / "model.safetensors").is_file()
    from tensorboard.backend.event_processing import event_accumulator

    events = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # the first run and the resumed one
    steps = []
    for path in events:
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        steps.extend(event.step for event in acc.Scalars("lm loss"))
    steps.sort()
    assert steps == list(range(1, 121))

    from megalign.data.indexed_dataset import IndexedDataset

    merged = IndexedDataset(str(workdir / "data" / "all_text_document"))
    parts = [IndexedDataset(str(workdir / "data" / f"{n}_text_document")) for n in ("arabic", "english")]
    assert merged.num_documents == sum(p.num_documents for p in parts) == 400
    assert merged.num_tokens == sum(p.num_tokens for p in parts)
