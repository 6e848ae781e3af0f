"""The shared "run a model" flags (megalign/inference/model_flags.py) in `align seed`, `align report`, `align rewrite`
and `serve`: every command parses them with its own defaults, --load with --hf-dir is an error naming both,
seed and report score in bf16 (on CPU here), and --hf-dir runs each command as the converted checkpoint does."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from megalign.align.records import StageInput
from megalign.cli import build_parser, main
from megalign.errors import ConfigError
from megalign.inference.model_flags import add_model_arguments, load_model_from_args, model_label

# command, the arguments it requires, the batch attribute and its default
COMMANDS = [
    ("align", ["seed", "--input", "in", "--output", "out", "--num", "3"], "batch_size", 8),
    ("align", ["report", "--aligned", "in", "--output", "out"], "batch_size", None),
    ("align", ["rewrite", "--input", "in", "--output", "out"], "batch_size", 8),
    ("serve", [], "max_batch_size", 16),
]
TEXTS = ["مرحبا بكم في المدينة القديمة وأسواقها", "The library opened in 1920 and holds old maps.",
         "كلمة " * 30, "A short note.", "تاريخ المدينة القديمة ومكتباتها وأسواقها الكبيرة " * 3, "x"]


def _corpus(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "a.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
                                          for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


@pytest.mark.parametrize("command, required, batch, batch_default", COMMANDS)
def test_every_command_parses_the_shared_group(command, required, batch, batch_default):
    parser = build_parser(command)
    args = parser.parse_args(required)
    assert (args.load, args.hf_dir, args.ckpt_step, args.tokenizer_type, args.tokenizer_model) == (None,) * 5
    assert (args.device, args.dtype, getattr(args, batch)) == ("cpu", "fp32", batch_default)
    args = parser.parse_args(required + ["--hf-dir", "hf", "--device", "cuda:1", "--dtype", "bf16", "--ckpt-step",
                                         "3", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tok",
                                         "--batch-size", "5"])
    assert (args.hf_dir, args.device, args.dtype, args.ckpt_step, args.tokenizer_model) == \
        ("hf", "cuda:1", "bf16", 3, "tok")
    assert getattr(args, batch) == 5
    assert parser.parse_args(required + ["--load", "ckpt", "--dtype", "fp16"]).load == "ckpt"
    for bad in (["--batch-size", "0"], ["--dtype", "fp8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(required + bad)
    if command == "serve":  # the old flag name and the positional checkpoint still work
        args = parser.parse_args(["ckpt", "--max-batch-size", "32"])
        assert (args.checkpoint, args.max_batch_size) == ("ckpt", 32)


@pytest.mark.parametrize("command, required, batch, batch_default", COMMANDS)
def test_load_with_hf_dir_is_an_error_naming_both(command, required, batch, batch_default, tmp_path, capsys):
    argv = [command] + required + ["--load", str(tmp_path / "ckpt"), "--hf-dir", str(tmp_path / "hf")]
    if required and required[0] == "seed":
        argv += ["--strategy", "ppl-high"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--load" in error and "--hf-dir" in error and "give one model, not both" in error, error
    assert not (tmp_path / "out").exists()


def test_model_label_checks():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, required=True)
    with pytest.raises(ConfigError, match="pass --load CHECKPOINT or --hf-dir DIR"):
        model_label(parser.parse_args([]))
    with pytest.raises(ConfigError, match="--ckpt-step 3 applies to --load checkpoints, not to --hf-dir"):
        model_label(parser.parse_args(["--hf-dir", "x", "--ckpt-step", "3"]))
    assert model_label(parser.parse_args(["--hf-dir", "x"])) == "x"
    optional = argparse.ArgumentParser()
    add_model_arguments(optional)
    assert model_label(optional.parse_args([])) is None
    with pytest.raises(ConfigError, match="this command runs a model"):
        load_model_from_args(optional.parse_args([]))


def _seed(tmp_path: Path, corpus: Path, name: str, *model: str) -> dict:
    assert main(["align", "seed", "--input", str(corpus), "--output", str(tmp_path / name), "--num", "3",
                 "--strategy", "ppl-high", "--batch-size", "2", *model]) == 0
    return {r["id"]: r["perplexity"] for r in StageInput([str(tmp_path / name)])}


def test_seed_scores_in_bf16_and_with_hf_dir(tmp_path, tiny_llama_checkpoint, tiny_llama_hf):
    from megalign.inference.model_loading import checkpoint_scorer

    corpus = _corpus(tmp_path / "corpus")
    fp32 = dict(zip((f"d{i}" for i in range(len(TEXTS))), checkpoint_scorer(str(tiny_llama_checkpoint))(TEXTS)))
    bf16 = _seed(tmp_path, corpus, "bf16", "--load", str(tiny_llama_checkpoint), "--dtype", "bf16")
    assert len(bf16) == 3 and all(math.isfinite(v) and v > 1.0 for v in bf16.values())
    assert bf16 != {rid: fp32[rid] for rid in bf16}  # really scored in bf16 ...
    for rid, value in bf16.items():  # ... and close to fp32
        assert value == pytest.approx(fp32[rid], rel=0.1)
    settings = json.loads((tmp_path / "bf16" / "manifest.json").read_text())["settings"]
    assert settings["dtype"] == "bf16" and settings["load"] == str(tiny_llama_checkpoint.resolve())
    direct = _seed(tmp_path, corpus, "hf", "--hf-dir", str(tiny_llama_hf[1]))
    chosen = sorted((v, k) for k, v in fp32.items() if not math.isnan(v))[-3:]
    assert sorted(direct) == sorted(k for _, k in chosen)
    for rid, value in direct.items():
        assert value == pytest.approx(fp32[rid], rel=1e-6)


def _aligned(path: Path) -> Path:
    from megalign.align.stage_output import ShardOutput

    with ShardOutput(path, "rewrite") as out:
        for i, text in enumerate(TEXTS[:4]):
            out.write({"id": f"d{i}", "text": text, "aligned_text": text.upper(), "status": "rewritten",
                       "reason": None})
        out.finish()
    return path


def test_report_scores_in_bf16_and_with_hf_dir(tmp_path, tiny_llama_checkpoint, tiny_llama_hf):
    from megalign.align.report import build_report

    aligned = _aligned(tmp_path / "aligned")
    assert main(["align", "report", "--aligned", str(aligned), "--output", str(tmp_path / "bf16"), "--no-plots",
                 "--load", str(tiny_llama_checkpoint), "--dtype", "bf16", "--batch-size", "2"]) == 0
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    fp32 = build_report([str(aligned)], str(tmp_path / "fp32"), load=str(tiny_llama_checkpoint), plots=False)
    ppl = report["perplexity"]
    assert ppl["dtype"] == "bf16" and fp32["perplexity"]["dtype"] == "fp32"
    assert ppl["original"]["documents"] == 4 and ppl["original"]["median"] > 1.0
    assert ppl["original"]["mean"] != fp32["perplexity"]["original"]["mean"]
    assert ppl["original"]["mean"] == pytest.approx(fp32["perplexity"]["original"]["mean"], rel=0.1)
    assert report["tokens"] == {**fp32["tokens"], "tokenizer_of": str(tiny_llama_checkpoint)}
    assert main(["align", "report", "--aligned", str(aligned), "--output", str(tmp_path / "hf"), "--no-plots",
                 "--hf-dir", str(tiny_llama_hf[1])]) == 0
    direct = json.loads((tmp_path / "hf" / "report.json").read_text())["perplexity"]
    assert direct["reference"] == str(tiny_llama_hf[1])
    for side in ("original", "aligned"):
        assert direct[side]["mean"] == pytest.approx(fp32["perplexity"][side]["mean"], rel=1e-6)


def test_rewrite_in_process_with_hf_dir_equals_load(tmp_path, tiny_llama_checkpoint, tiny_llama_hf):
    corpus = _corpus(tmp_path / "corpus")
    outputs = {}
    for name, model in (("load", ["--load", str(tiny_llama_checkpoint)]), ("hf", ["--hf-dir", str(tiny_llama_hf[1])])):
        assert main(["align", "rewrite", "--input", str(corpus), "--output", str(tmp_path / name), "--max-tokens", "6",
                     "--batch-size", "3", *model]) == 0
        outputs[name] = {r["id"]: (r["status"], r.get("aligned_text"), r["usage"])
                         for r in StageInput([str(tmp_path / name)])}
    assert outputs["load"] == outputs["hf"] and len(outputs["hf"]) == len(TEXTS)
    settings = json.loads((tmp_path / "hf" / "manifest.json").read_text())["settings"]
    assert settings["worker"] == str(tiny_llama_hf[1]) and settings["dtype"] == "fp32"


def test_serve_hf_dir_and_positional_checkpoint(tmp_path, tiny_llama_hf, tiny_llama_checkpoint, capsys):
    from megalign.inference.serve_cli import build_server

    parser = build_parser("serve")
    server = build_server(parser.parse_args(["--hf-dir", str(tiny_llama_hf[1]), "--port", "0", "--dtype", "bf16"]))
    try:
        out = capsys.readouterr().out
        assert "(Hugging Face folder, tokenizer" in out and f"as {tiny_llama_hf[1].name!r}" in out
        assert str(server.engine.generator.model.embed_tokens.weight.dtype) == "torch.bfloat16"
    finally:
        server.httpd.server_close()
        server.engine.close()
    with pytest.raises(ConfigError, match="CHECKPOINT .* and --hf-dir .*: give one model, not both"):
        build_server(parser.parse_args([str(tiny_llama_checkpoint), "--hf-dir", str(tiny_llama_hf[1])]))
    with pytest.raises(ConfigError, match=r"megalign serve CHECKPOINT \(or --load CHECKPOINT, or --hf-dir DIR\)"):
        build_server(parser.parse_args(["--port", "0"]))
