"""The steps of `megalign demo` (described in megalign/demo/__init__.py) and its command-line entry.

The sample corpus ships inside the package (megalign/demo/data/sample.jsonl) and is read through
importlib.resources, so the demo runs from an installed wheel as well as from a source checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Sequence

from megalign.errors import MegalignError

EXAMPLES = """examples:
  megalign demo --workdir demo_output
  megalign demo --workdir /tmp/demo --sequence-length 256 --fresh
"""

# (package, path inside it) of the shipped sample corpus; package data, so it is in wheels and sdists.
SAMPLE_RESOURCE = ("megalign.demo", ("data", "sample.jsonl"))


def sample_corpus() -> ContextManager[Path]:
    """A context manager giving a filesystem path to the shipped sample corpus (a temporary copy only when
    the package is imported from a zip)."""
    from importlib import resources

    package, parts = SAMPLE_RESOURCE
    resource = resources.files(package)
    for part in parts:
        resource = resource / part
    return resources.as_file(resource)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo_output", help="folder for everything the demo writes")
    parser.add_argument("--corpus", default=None, help="JSONL corpus (default: the shipped sample)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary (default: %(default)s)")
    parser.add_argument("--sequence-length", type=int, default=128, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing workers (default: %(default)s)")
    parser.add_argument("--train-iters", type=int, default=120, help="training steps (default: %(default)s)")
    parser.add_argument("--sft-iters", type=int, default=40, help="fine-tuning steps (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(command: str, argv: Sequence[str]) -> None:
    """Print `megalign COMMAND ARGV` and run it in-process, failing the demo if it fails."""
    from megalign.cli import run_command

    print("$ megalign " + " ".join(shlex.quote(a) for a in [command, *argv]), flush=True)
    status = run_command(command, list(argv))
    if status != 0:
        raise MegalignError(f"demo step `megalign {command}` failed with exit status {status}")


def split_by_language(corpus: Path, out_dir: Path) -> List[Path]:
    """Write the Arabic records and the English/mixed records of `corpus` to two JSONL files."""
    from megalign.data.jsonl import iter_records
    from megalign.utils.atomic import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"arabic": out_dir / "arabic.jsonl", "english": out_dir / "english.jsonl"}
    lines: Dict[str, List[str]] = {name: [] for name in parts}
    for _, record in iter_records(str(corpus), ("text",)):
        part = "arabic" if record.get("lang", "ar") == "ar" else "english"
        lines[part].append(json.dumps(record, ensure_ascii=False))
    for name, path in parts.items():
        with atomic_write(path) as handle:
            handle.write("\n".join(lines[name]) + "\n")
        print(f"{path}: {len(lines[name])} documents")
    return list(parts.values())


def parallel_training(workdir: Path, data_path: str, tokenizer_model: Path) -> None:
    """Train 20 steps at TP 2 x PP 2 (+ sequence parallel) on 4 local processes with torchrun, then resume that
    checkpoint in one process (a different layout) to step 30."""
    save = workdir / "parallel_checkpoints"
    if save.exists():
        shutil.rmtree(save)
    common = [
        "--model-preset",
        "tiny",
        "--num-layers",
        "4",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        "5",
        "--lr-decay-iters",
        "30",
        "--data-path",
        data_path,
        "--split",
        "90,10,0",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(tokenizer_model),
        "--data-cache-path",
        str(workdir / "index_cache"),
        "--log-interval",
        "10",
        "--eval-iters",
        "2",
        "--seed",
        "1234",
        "--save",
        str(save),
    ]
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]
    _torchrun([*common, *layout, "--train-iters", "20", "--eval-interval", "20"], 4)
    _run("train", [*common, "--load", str(save), "--train-iters", "30", "--eval-interval", "30"])


def _torchrun(argv: Sequence[str], processes: int) -> None:
    """Print and run `torchrun --nproc-per-node PROCESSES ... megalign train ARGV` on gloo (CPU processes)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "megalign.cli", "train", *argv, "--distributed-backend", "gloo"]  # fmt: skip
    print("$ " + " ".join(shlex.quote(a) for a in ["torchrun", *command[3:]]), flush=True)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    if subprocess.run(command, env=environment).returncode != 0:
        raise MegalignError("demo step `torchrun ... megalign train` (parallel training) failed")


def hf_export(workdir: Path, load: Path, data_path: str, tokenizer_model: Path, sequence_length: int) -> None:
    """Export ``load`` to a Hugging Face folder and compare transformers' loss on one batch with megalign's."""
    import torch

    from megalign.data.indexed_dataset import IndexedDataset
    from megalign.data.tokenizers import build_tokenizer
    from megalign.inference.model_loading import load_hf_model, load_model

    vocab = build_tokenizer("SentencePieceTokenizer", str(tokenizer_model)).vocab_size
    out = workdir / "hf_export"
    if out.exists():
        shutil.rmtree(out)
    _run(
        "convert",
        [
            "megalign-to-hf",
            "--load",
            str(load),
            "--hf-dir",
            str(out),
            "--dtype",
            "fp32",
            "--vocab-size",
            str(vocab),
            "--no-progress",
        ],
    )
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install -e '.[hf]'): skipping the comparison")
        return
    dataset = IndexedDataset(data_path)
    tokens = torch.cat([torch.as_tensor(dataset.get(i).astype("int64")) for i in range(min(len(dataset), 64))])
    batch = tokens[: 2 * sequence_length].reshape(2, sequence_length)
    ours = load_model(load, tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tokenizer_model)).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = ours(batch[:, :-1])[..., :vocab]
        loss_ours = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        loss_hf = hf(input_ids=batch, labels=batch).loss
        hf_logits = hf(input_ids=batch[:, :-1]).logits
    difference = (logits - hf_logits).abs().max().item()
    print(
        f"transformers {type(hf).__name__}: loss {loss_hf.item():.6f}; megalign: loss {loss_ours.item():.6f}; "
        f"largest logit difference {difference:.2e}"
    )
    if abs(loss_hf.item() - loss_ours.item()) > 1e-4 or difference > 1e-3:
        raise MegalignError(f"demo step 11: the exported model in {out} disagrees with the megalign checkpoint")
    # the folder loaded straight into megalign, as `--hf-dir` does for align seed/report/rewrite and serve
    direct = load_hf_model(out, tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tokenizer_model))
    with torch.no_grad():
        direct_difference = (direct.model(batch[:, :-1])[..., :vocab] - logits).abs().max().item()
    print(f"megalign --hf-dir {out.name}: largest logit difference from the checkpoint {direct_difference:.2e}")
    if direct_difference > 1e-4:
        raise MegalignError(f"demo step 11: {out} loaded with --hf-dir disagrees with the megalign checkpoint")


def show_datasets(data_prefixes: List[str], tokenizer_model: Path, cache_dir: Path, sequence_length: int) -> None:
    """Build the blended train/valid datasets, print statistics, decoded samples and a sampler batch."""
    from megalign.data.dataset_builder import build_gpt_datasets
    from megalign.data.gpt_dataset import GPTDatasetConfig
    from megalign.data.samplers import PretrainingSampler
    from megalign.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("SentencePieceTokenizer", str(tokenizer_model))
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=sequence_length,
        blend=(data_prefixes, [0.8, 0.2]),
        split="90,10,0",
        path_to_cache=str(cache_dir),
        eod_token=tokenizer.eod,
        pad_token=tokenizer.pad,
        reset_position_ids=True,
    )
    print(
        "GPTDatasetConfig(blend=(['arabic', 'english'], [0.8, 0.2]), split='90,10,0', "
        f"sequence_length={sequence_length}, cache={cache_dir})"
    )
    started = time.perf_counter()
    train, valid, _ = build_gpt_datasets(config, [256, 32, 0])
    if train is None or valid is None:
        raise MegalignError("demo step 4: the 90,10,0 split built no train or no valid dataset")
    print(
        f"built train ({len(train)} samples) and valid ({len(valid)} samples) in {time.perf_counter() - started:.2f}s"
    )
    started = time.perf_counter()
    build_gpt_datasets(config, [256, 32, 0])
    print(f"rebuilt from the index cache in {time.perf_counter() - started:.2f}s")

    for index in range(2):
        sample = train[index]
        tokens = sample["tokens"].tolist()
        eods = sum(1 for token in tokens if token == tokenizer.eod)
        text = tokenizer.decode([t for t in tokens if t != tokenizer.eod]).replace("\n", " ")
        print(
            f"\ntrain[{index}]: {len(tokens)} tokens, {eods} document boundaries (EOD), "
            f"loss on {int(sample['loss_mask'].sum())} positions"
        )
        print("  " + (text[:300] + " ..." if len(text) > 300 else text))

    sampler = PretrainingSampler(
        total_samples=len(train), consumed_samples=8, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2
    )
    print(f"\nresumed after 8 consumed samples, DP rank 1 of 2, micro-batch 2: first batches {list(sampler)[:3]}")


def main(args: argparse.Namespace) -> int:
    """Run every demo step on ``args.corpus`` (the shipped sample when it is not given)."""
    corpus: Optional[str] = args.corpus
    if corpus is not None:
        return run_demo(args, Path(corpus))
    with sample_corpus() as path:
        return run_demo(args, path)


def run_demo(args: argparse.Namespace, corpus: Path) -> int:
    """The demo steps 1 to 11 on ``corpus``, writing under ``args.workdir``."""
    if not corpus.is_file():
        raise MegalignError(f"demo corpus {corpus} not found; pass --corpus FILE.jsonl")
    workdir = Path(args.workdir)
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _step("1. Train a tokenizer on the sample corpus")
    _run(
        "train-tokenizer",
        [
            "--input",
            str(corpus),
            "--output-dir",
            str(workdir / "tokenizer"),
            "--tokenizer-kind",
            "sentencepiece",
            "--vocab-size",
            str(args.vocab_size),
        ],
    )
    tokenizer_model = workdir / "tokenizer" / "tokenizer.model"

    _step("2. Split the corpus by language and tokenize each part into Megatron .bin/.idx")
    parts = split_by_language(corpus, workdir / "corpus")
    prefixes = []
    for part in parts:
        prefix = workdir / "data" / part.stem
        _run(
            "preprocess",
            [
                "--input",
                str(part),
                "--output-prefix",
                str(prefix),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                str(tokenizer_model),
                "--workers",
                str(args.workers),
                "--append-eod",
            ],
        )
        prefixes.append(f"{prefix}_text_document")

    _step("3. Merge the parts into one dataset (as with preprocessing shards)")
    _run("merge-datasets", ["--input", *prefixes, "--output-prefix", str(workdir / "data" / "all_text_document")])

    _step("4. Blended GPT datasets (80% Arabic / 20% English), split, cached indices, DP sampler")
    show_datasets(prefixes, tokenizer_model, workdir / "index_cache", args.sequence_length)

    _step("5. Train the tiny LLaMA-style preset with --save X --load X (X empty: from scratch; stops half-way)")
    checkpoints = workdir / "checkpoints"
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    half = args.train_iters // 2
    train_args = [
        "--model-preset",
        "tiny",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        "10",
        "--lr-decay-iters",
        str(args.train_iters),
        "--data-path",
        "0.8",
        prefixes[0],
        "0.2",
        prefixes[1],
        "--split",
        "90,10,0",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(tokenizer_model),
        "--data-cache-path",
        str(workdir / "index_cache"),
        "--save",
        str(checkpoints),
        "--log-interval",
        "20",
        "--eval-interval",
        str(half),
        "--eval-iters",
        "2",
        "--seed",
        "1234",
        "--recompute-granularity",
        "selective",
        "--tensorboard-dir",
        str(workdir / "tensorboard"),
    ]
    _run("train", [*train_args, "--train-iters", str(half), "--load", str(checkpoints)])  # --save X --load X

    _step("6. Resume from the checkpoint and finish the run (model, optimizer, schedule, data position)")
    _run("train", [*train_args, "--train-iters", str(args.train_iters), "--load", str(checkpoints)])
    print(f"TensorBoard events: {workdir / 'tensorboard'} (view with: tensorboard --logdir {workdir / 'tensorboard'})")

    _step("7. Parallel training: 4 CPU processes, tensor parallel 2 x pipeline parallel 2, sequence parallel (gloo)")
    parallel_training(workdir, str(workdir / "data" / "all_text_document"), tokenizer_model)

    _step(
        "8. Native alignment: dedup, seed by perplexity, expert annotation over the OpenAI API (a rule-based "
        "stand-in), worker fine-tuning"
    )
    from megalign.demo import alignment as demo_alignment

    align = workdir / "align"
    sft_pairs = demo_alignment.expert_annotation(_run, align, corpus, checkpoints)
    _run(
        "preprocess",
        [
            "--sft",
            "--input",
            str(sft_pairs),
            "--output-prefix",
            str(align / "worker"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(tokenizer_model),
            "--workers",
            str(args.workers),
        ],
    )
    worker = workdir / "worker_checkpoints"
    if worker.exists():
        shutil.rmtree(worker)
    _run(
        "train",
        [
            "--sft",
            "--model-preset",
            "tiny",
            "--seq-length",
            "256",
            "--micro-batch-size",
            "4",
            "--global-batch-size",
            "8",
            "--lr",
            "3e-3",
            "--lr-warmup-iters",
            "4",
            "--train-iters",
            str(args.sft_iters),
            "--data-path",
            str(align / "worker_sft_document"),
            "--split",
            "90,10,0",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(tokenizer_model),
            "--data-cache-path",
            str(workdir / "index_cache"),
            "--load",
            str(checkpoints),
            "--finetune",
            "--save",
            str(worker),
            "--log-interval",
            "10",
            "--eval-interval",
            str(args.sft_iters),
            "--eval-iters",
            "2",
            "--seed",
            "1234",
        ],
    )

    _step(
        "9. Rewrite the corpus: shard 0 of 8 with the worker in-process, shard 1 through `megalign serve`, "
        "shard 2 through the stand-in"
    )
    parts = demo_alignment.rewrite_corpus(_run, align, worker)

    _step("10. Quality report: original vs aligned (perplexity, contact details, toxicity, kept facts)")
    demo_alignment.quality_report(_run, align, parts, checkpoints)

    _step(
        "11. Export the TP 2 x PP 2 checkpoint to Hugging Face; transformers gives megalign's loss, and so does "
        "the folder loaded back with --hf-dir"
    )
    hf_export(
        workdir, workdir / "parallel_checkpoints", str(workdir / "data" / "all_text_document"), tokenizer_model, 64
    )

    _step(
        "12. Megatron-LM's own Llama-3 launch flags as they are (tiny sizes, --mock-data, Llama-3's 128,256-token "
        "vocabulary): fp8 refused, TP 4 on 4 processes from scratch (--save X --load X), resumed in one process "
        "with --use-checkpoint-args"
    )
    from megalign.demo.megatron_dropin import megatron_dropin

    megatron_dropin(workdir, _run, _torchrun)

    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; outputs in {workdir}/", flush=True)
    return 0
