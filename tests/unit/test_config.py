"""Training configuration: flag table, CLI + YAML loading, conflicts, constraints, round trips, consumers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

import pytest
import torch

from megalign.config import TrainingConfig, add_arguments, build_parser, config_from_namespace, load_config, read_yaml
from megalign.config.training import CONFLICTS, FLAGS, FLAGS_BY_DEST, flags_markdown
from megalign.errors import ConfigError
from megalign.config.model import PRESETS
from megalign.model.decoder import GPTModel
from megalign.training.lr_schedule import LRSchedule
from megalign.training.optimizer import MixedPrecisionOptimizer

BASE = ["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "100",
        "--lr", "3e-4"]


def _load(*extra: str) -> TrainingConfig:
    return load_config(BASE + list(extra))


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_are_megatrons() -> None:
    cfg = _load()
    assert cfg.data.split == "969,30,1" and cfg.data.make_vocab_size_divisible_by == 128
    opt = cfg.optimization
    assert (opt.min_lr, opt.lr_decay_style, opt.lr_warmup_iters, opt.weight_decay) == (0.0, "linear", 0, 0.01)
    assert (opt.adam_beta1, opt.adam_beta2, opt.adam_eps, opt.clip_grad) == (0.9, 0.999, 1e-8, 1.0)
    p = cfg.precision
    assert (p.bf16, p.fp16, p.initial_loss_scale, p.loss_scale) == (False, False, 2.0 ** 32, None)
    assert (p.loss_scale_window, p.hysteresis, p.min_loss_scale) == (1000, 2, 1.0)
    assert (cfg.logging.eval_interval, cfg.logging.eval_iters, cfg.logging.log_interval) == (1000, 100, 100)
    assert cfg.misc.seed == 1234 and not cfg.misc.sft and cfg.checkpointing.save is None
    assert cfg.global_batch_size == 2 and cfg.train_iters == 100 and cfg.num_microbatches == 1
    assert cfg.model_config() == PRESETS["tiny"]


def test_cli_parse_sets_every_kind_of_value() -> None:
    cfg = _load("--global-batch-size", "8", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1",
                "--bf16", "--data-path", "0.3", "a/x", "0.7", "b/y", "--split", "98,2,0", "--recompute-granularity",
                "full", "--recompute-method", "uniform", "--recompute-num-layers", "1", "--save", "ckpt",
                "--save-interval", "50", "--keep-last", "3", "--max-consecutive-skipped-steps", "5",
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tok", "--eod-mask-loss")
    assert cfg.global_batch_size == 8 and cfg.num_microbatches == 4
    assert cfg.optimization.lr_decay_style == "cosine" and cfg.optimization.lr_warmup_fraction == 0.1
    assert cfg.precision.bf16 and cfg.data.eod_mask_loss
    assert cfg.data.data_path == ["0.3", "a/x", "0.7", "b/y"]
    assert cfg.recompute.recompute_num_layers == 1 and cfg.checkpointing.keep_last == 3


def test_cli_type_errors_go_through_argparse(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        load_config(BASE + ["--micro-batch-size", "0"])
    assert "--micro-batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(BASE + ["--lr-decay-style", "sine"])
    assert "cosine" in capsys.readouterr().err


def test_decay_style_is_case_insensitive_like_megatrons_wsd() -> None:
    cfg = _load("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10")
    assert cfg.optimization.lr_decay_style == "wsd"


@pytest.mark.parametrize("style", ["underscores", "dashes"])
def test_yaml_keys_in_both_styles_and_cli_overrides(tmp_path: Path, style: str) -> None:
    sep = "_" if style == "underscores" else "-"
    path = _yaml(tmp_path, "\n".join([
        "model-preset: tiny", f"seq{sep}length: 32", f"micro{sep}batch{sep}size: 4", f"global{sep}batch{sep}size: 16",
        f"train{sep}samples: 1600", "lr: 1e-3", f"min{sep}lr: 1.0e-5", "bf16: true", f"num{sep}layers: 3",
        f"data{sep}path: [0.5, data/a, 0.5, data/b]", f"lr{sep}decay{sep}style: cosine"]))
    cfg = load_config(["--config", path, "--lr", "2e-4", "--micro-batch-size", "8"])
    assert cfg.optimization.lr == 2e-4 and cfg.optimization.micro_batch_size == 8  # CLI wins
    assert cfg.optimization.min_lr == 1e-5 and cfg.optimization.lr_decay_style == "cosine"  # from YAML
    assert cfg.model.seq_length == 32 and cfg.precision.bf16 and cfg.train_iters == 100
    assert cfg.data.data_path == ["0.5", "data/a", "0.5", "data/b"]
    assert cfg.model_config().num_layers == 3 and cfg.num_microbatches == 2


def test_yaml_unknown_key_names_file_and_suggests(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "micro_batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'micro_batch_sise'; did you mean "
                                          r"'micro_batch_size'"):
        load_config(["--config", path])


@pytest.mark.parametrize("text, match", [
    ("lr: fast\n", r"run\.yaml: --lr: expected a number, got 'fast'"),
    ("bf16: 1\n", r"run\.yaml: --bf16: expected true or false"),
    ("micro_batch_size: 2.5\n", r"run\.yaml: --micro-batch-size: expected an integer"),
    ("micro_batch_size: 2\nmicro-batch-size: 3\n", r"given twice"),
    ("- a\n- b\n", r"run\.yaml: expected a mapping"),
    ("seed: null\n", r"--seed: needs an integer, got null"),
    ("lr: [\n", r"not valid YAML"),
])
def test_yaml_bad_values_name_file_and_flag(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_yaml(_yaml(tmp_path, text))


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: cannot read it"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("first, second", CONFLICTS)
def test_conflicting_flags_name_both(first: str, second: str) -> None:
    values = {"bf16": [], "fp16": [], "train_iters": ["200"], "train_samples": ["200"], "lr_warmup_iters": ["5"],
              "lr_warmup_fraction": ["0.1"]}
    argv: List[str] = []
    for dest in (first, second):
        argv += [FLAGS_BY_DEST[dest].name] + values[dest]
    with pytest.raises(ConfigError) as info:
        _load(*argv)
    assert FLAGS_BY_DEST[first].name in str(info.value) and FLAGS_BY_DEST[second].name in str(info.value)


def test_conflict_across_yaml_and_cli_is_caught(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "bf16: true\n")
    with pytest.raises(ConfigError, match="--bf16 and --fp16"):
        load_config(BASE + ["--config", path, "--fp16"])


@pytest.mark.parametrize("argv, match", [
    (["--global-batch-size", "5"], r"--global-batch-size 5 must be divisible by --micro-batch-size 2"),
    (["--min-lr", "1e-3"], r"--min-lr 0.001 must not exceed --lr 0.0003"),
    (["--seq-length", "512"], r"--seq-length 512 must not exceed --max-position-embeddings 256"),
    (["--num-attention-heads", "3"], r"--num-attention-heads 3 must divide --hidden-size 64"),
    (["--num-query-groups", "3"], r"--num-query-groups 3 must divide --num-attention-heads 4"),
    (["--tensor-model-parallel-size", "2"], r"world size 1 must be divisible by --tensor-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "4"], r"--pipeline-model-parallel-size 4 = 4 \(data parallel"),
    (["--lr-warmup-iters", "100"], r"--lr-warmup-iters 100 must be >= 0 and smaller than --lr-decay-iters"),
    (["--lr-decay-style", "wsd"], r"--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-wsd-decay-iters", "5"], r"--lr-wsd-decay-iters is only used with --lr-decay-style wsd"),
    (["--adam-beta2", "1.0"], r"--adam-beta2 1 must be in \[0, 1\)"),
    (["--loss-scale", "1024"], r"--loss-scale is only used with --fp16"),
    (["--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"],
     r"--min-loss-scale 8 must be > 0 and must not exceed --initial-loss-scale 4"),
    (["--recompute-method", "block"], r"--recompute-method and --recompute-num-layers need --recompute-granularity"),
    (["--recompute-granularity", "full"], r"--recompute-granularity full needs --recompute-method"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], r"selective takes no"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
     r"--recompute-num-layers 3 must not exceed --num-layers 2"),
    (["--save-interval", "10"], r"--save-interval needs --save"),
    (["--keep-last", "2"], r"--keep-last needs --save"),
    (["--finetune"], r"--finetune needs --load"),
    (["--data-path", "0.5", "a", "b", "c"], r"--data-path: .* mixes weights and prefixes"),
    (["--split", "90,x"], r"--split: \"90,x\" is not"),
    (["--tokenizer-model", "tok.model"], r"--tokenizer-model needs --tokenizer-type"),
    (["--seed", "4294967296"], r"--seed 4294967296 must be < 2\*\*32"),
    (["--train-iters", "100", "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "0.1",
      "--train-samples", "4"], r"--train-iters and --train-samples"),
])
def test_constraint_errors_name_the_flags(argv: List[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _load(*argv)


def test_train_samples_below_one_step() -> None:
    with pytest.raises(ConfigError, match=r"--train-samples 4 must be at least --global-batch-size 8"):
        load_config(["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
                     "--global-batch-size", "8", "--train-samples", "4", "--lr", "1e-3"])


@pytest.mark.parametrize("drop, match", [
    ("--seq-length", "--seq-length is required"), ("--micro-batch-size", "--micro-batch-size is required"),
    ("--lr", "--lr is required"), ("--train-iters", "give --train-iters or --train-samples"),
    ("--model-preset", "give --model-preset, or --num-layers, --hidden-size, --num-attention-heads"),
])
def test_required_flags(drop: str, match: str) -> None:
    i = BASE.index(drop)
    with pytest.raises(ConfigError, match=match):
        load_config(BASE[:i] + BASE[i + 2:])


def test_model_without_preset_uses_megatron_rules() -> None:
    cfg = load_config(["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "6", "--seq-length",
                       "128", "--micro-batch-size", "1", "--train-iters", "10", "--lr", "1e-3", "--swiglu",
                       "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear"])
    with pytest.raises(ConfigError, match="needs a vocabulary size"):
        cfg.model_config()
    model = cfg.model_config(vocab_size=512)
    assert (model.intermediate_size, model.num_key_value_heads, model.max_position_embeddings) == (256, 6, 128)
    assert model.vocab_size == 512 and model.rope_theta == 10000.0
    # Megatron's defaults for the flags not given (docs/configuration.md, "Megatron-LM flags")
    assert model.tie_word_embeddings and (model.attention_dropout, model.hidden_dropout) == (0.1, 0.1)


def test_presets_selectable_with_overrides() -> None:
    for name in PRESETS:
        assert _load("--model-preset", name).model_config() == PRESETS[name]
    cfg = _load("--model-preset", "small", "--num-layers", "2", "--rotary-base", "500000", "--num-query-groups",
                "2", "--ffn-hidden-size", "512", "--vocab-size", "1000", "--norm-epsilon", "1e-6")
    model = cfg.model_config()
    assert (model.num_layers, model.rope_theta, model.num_key_value_heads, model.intermediate_size) == (
        2, 500000.0, 2, 512)
    assert (model.vocab_size, model.rms_norm_eps, model.hidden_size) == (1000, 1e-6, PRESETS["small"].hidden_size)
    assert cfg.model_config(vocab_size=1024).vocab_size == 1024  # the tokenizer's padded size wins


def test_to_dict_is_json_and_round_trips() -> None:
    cfg = _load("--bf16", "--data-path", "a", "b", "--lr-decay-style", "cosine", "--save", "s", "--keep-last", "2")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["optimization"]["lr"] == 3e-4 and data["data"]["data_path"] == ["a", "b"]
    again = TrainingConfig.from_dict(data)
    assert again == cfg and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(extra={}), "unknown section 'extra'"),
    (lambda d: d["optimization"].update(bf16=True), "optimization.bf16 is not a setting"),
    (lambda d: d["optimization"].update(lr="x"), "--lr: expected a number"),
])
def test_from_dict_rejects_bad_input(mutate, match: str) -> None:
    data = _load().to_dict()
    mutate(data)
    with pytest.raises(ConfigError, match=match):
        TrainingConfig.from_dict(data)


def test_lr_schedule_reads_its_section() -> None:
    cfg = _load("--lr-warmup-iters", "10", "--lr-decay-style", "cosine", "--min-lr", "3e-5")
    sched = LRSchedule.from_config(cfg.optimization, cfg.train_iters)
    assert (sched.lr, sched.min_lr, sched.warmup_steps, sched.decay_steps) == (3e-4, 3e-5, 10, 100)
    assert sched.lr_at(10) == pytest.approx(3e-4) and sched.lr_at(100) == pytest.approx(3e-5)
    # --train-samples: steps = samples // global batch; the schedule counts samples (Megatron's), the warmup
    # fraction is of the decay samples, and each update advances it by the global batch size
    samples = load_config(["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
                           "--global-batch-size", "4", "--train-samples", "400", "--lr", "1e-3",
                           "--lr-warmup-fraction", "0.25"])
    sched = LRSchedule.from_config(samples.optimization, samples.train_iters, samples.global_batch_size)
    assert samples.train_iters == 100 and sched.step_unit == "samples" and sched.increment == 4
    assert (sched.decay_steps, sched.warmup_steps) == (400, 100.0)


def test_optimizer_reads_its_section() -> None:
    cfg = _load("--weight-decay", "0.1", "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6",
                "--clip-grad", "0.5")
    torch.manual_seed(0)
    model = GPTModel(cfg.model_config())
    opt = MixedPrecisionOptimizer.from_config(model, cfg.optimization, cfg.parallel)
    try:
        group = opt.param_groups[0]
        assert group["lr"] == 3e-4 and group["weight_decay"] == 0.1
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and opt.clip_grad == 0.5
    finally:
        opt.close()


def test_namespace_from_add_arguments_parser(tmp_path: Path) -> None:
    """The `megalign train` path: a subcommand parser + config_from_namespace; explicit flags override YAML."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = _yaml(tmp_path, "lr: 0.01\nseq_length: 16\n")
    cfg = config_from_namespace(parser.parse_args(BASE[:-2] + ["--config", path, "--seq-length", "8"]))
    assert cfg.optimization.lr == 0.01 and cfg.model.seq_length == 8


def test_help_lists_groups_and_defaults() -> None:
    text = build_parser().format_help()
    assert "Mixed precision:" in text and "--recompute-granularity {full,selective}" in text
    assert "(default: 1000)" in text and "--config FILE.yaml" in text


def test_every_flag_is_a_field_with_its_default() -> None:
    cfg = TrainingConfig()
    for flag in FLAGS:
        assert getattr(getattr(cfg, flag.section), flag.dest) == flag.default, flag.name
    assert set(cfg.flat()) == set(FLAGS_BY_DEST)


def test_docs_contain_the_generated_flag_table(repo_root: Path) -> None:
    table = flags_markdown()
    assert "| `--micro-batch-size` |" in table and "### Mixed precision" in table
    docs = (repo_root / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert table in docs, "docs/configuration.md is stale: regenerate its flag table with flags_markdown()"


@pytest.mark.parametrize("world, argv, match", [
    (4, ["--tensor-model-parallel-size", "3"], r"world size 4 must be divisible by --tensor-model-parallel-size 3"),
    (8, ["--tensor-model-parallel-size", "8"], r"--tensor-model-parallel-size 8 must divide --num-attention-heads 4"),
    (6, ["--tensor-model-parallel-size", "3", "--num-attention-heads", "6", "--hidden-size", "96",
         "--num-query-groups", "2"], r"--tensor-model-parallel-size 3 must divide --num-query-groups 2"),
    (4, ["--pipeline-model-parallel-size", "4"], r"--num-layers 2 cannot be split into 4 pipeline stages"),
    (4, ["--pipeline-model-parallel-size", "2", "--num-layers", "6", "--decoder-first-pipeline-num-layers", "7"],
     r"--num-layers 6 cannot be split into 2 pipeline stages with --decoder-first-pipeline-num-layers 7"),
    (1, ["--decoder-last-pipeline-num-layers", "1"], r"need --pipeline-model-parallel-size > 1"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "6", "--num-layers-per-virtual-pipeline-stage", "2"],
     r"--num-layers 6 / --pipeline-model-parallel-size 2 must be a multiple of --num-layers-per-virtual"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2",
         "--global-batch-size", "6"], r"micro-batches per step \(3 = .*multiple of --pipeline-model-parallel-size 2"),
])
def test_parallel_layout_errors_name_the_constraint(monkeypatch: pytest.MonkeyPatch, world: int, argv: List[str],
                                                    match: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=match):
        _load(*argv)


def test_sequence_parallel_at_tp1_is_switched_off_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Megatron's rule (its Llama script passes --sequence-parallel at TP 1)."""
    with caplog.at_level("WARNING"):
        assert not _load("--sequence-parallel").parallel.sequence_parallel
    assert "--sequence-parallel is disabled: --tensor-model-parallel-size is 1" in caplog.text


def test_parallel_layout_derives_data_parallel_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    config = _load("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--num-layers", "8",
                   "--num-layers-per-virtual-pipeline-stage", "2", "--global-batch-size", "8")
    assert config.data_parallel_size == 2 and config.num_microbatches == 2 and config.num_model_chunks == 2
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        _load()



def _config_of(section_fields: list, title: str = "Extra") -> type:
    """A config with one section made of ``section_fields`` ((name, type, field) triples), as a module would
    declare it (make_dataclass keeps the real types, so no annotation strings need resolving here)."""
    import dataclasses

    section = dataclasses.make_dataclass("ExtraSection", section_fields, namespace={"title": title})
    return dataclasses.make_dataclass("Config", [("extra", section, dataclasses.field(default_factory=section))])


def test_a_new_flag_is_one_field_with_its_help() -> None:
    """Declaring a section field with setting() makes it a flag: parser, value checks and docs come from it."""
    import dataclasses
    from typing import Dict, Optional

    from megalign.config.flags import add_flag_arguments, collect_flags, setting
    from megalign.config.flags import flags_markdown as markdown

    config = _config_of([("warmup_tokens", Optional[int], setting(None, "Tokens to warm up on.", minimum=1))])
    sections, flags = collect_flags(config)
    assert sections == (("extra", "Extra"),) and [f.name for f in flags] == ["--warmup-tokens"]
    parser = argparse.ArgumentParser()
    add_flag_arguments(parser, sections, flags)
    assert parser.parse_args(["--warmup-tokens", "5"]).warmup_tokens == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["--warmup-tokens", "0"])
    assert "| `--warmup-tokens` | - | Tokens to warm up on. |" in markdown(sections, flags)
    with pytest.raises(TypeError, match="typed int, float, str, bool or List"):
        collect_flags(_config_of([("table", Dict[str, int], setting(None, "Not a flag kind."))]))
    with pytest.raises(TypeError, match="declare settings with"):
        collect_flags(_config_of([("value", int, dataclasses.field(default=3))]))
