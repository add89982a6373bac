"""One source of each default: a stage option's value is stated once, in its options dataclass; the CLI's
parsers default to None and are filled from it, and the stage functions' keyword defaults are the same objects."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from pipeline.cli import build_parser
from pipeline.cli.commands.train import config_from_args
from pipeline.options import TaskOptions, from_args
from stages.dedup.options import DedupOptions
from stages.dedup.stage import dedup
from stages.evaluate.options import EvaluateOptions
from stages.evaluate.stage import evaluate
from stages.ingest.base import ingest_grown
from stages.ingest.options import IngestOptions
from stages.ingest.stage import ingest
from stages.logits.check_options import CheckViewsOptions
from stages.logits.check_views import check_views
from stages.logits.options import LogitsOptions
from stages.logits.stage import compute_logits
from stages.reshard.options import ReshardOptions
from stages.reshard.stage import reshard
from stages.select.options import SelectOptions
from stages.select.stage import select
from stages.train.config import TrainConfig

RENAMED = {"compile": "compile_model"}  # option name -> the stage function's parameter
STAGES = [(ingest, IngestOptions), (ingest_grown, IngestOptions), (compute_logits, LogitsOptions),
          (select, SelectOptions), (dedup, DedupOptions), (reshard, ReshardOptions), (evaluate, EvaluateOptions),
          (check_views, CheckViewsOptions)]
REQUIRED = {"select": ["--logits", "L", "--out", "O", "--per-class", "5"], "dedup": ["--query", "Q", "--out", "O"],
            "logits": ["--data", "D", "--teacher", "T", "--topk", "5", "--temperature", "2", "--out", "O"],
            "reshard": ["--selection", "S", "--out", "O"], "ingest": ["digits", "--out", "O"],
            "evaluate": ["--out", "O"], "check_views": ["--logits", "L"]}
OPTIONS = {"select": SelectOptions, "dedup": DedupOptions, "logits": LogitsOptions, "reshard": ReshardOptions,
           "ingest": IngestOptions, "evaluate": EvaluateOptions, "check_views": CheckViewsOptions}


@pytest.mark.parametrize("function, options", STAGES, ids=[f.__name__ for f, _ in STAGES])
def test_stage_functions_take_their_keyword_defaults_from_the_options_dataclass(function, options):
    params = inspect.signature(function).parameters
    for field in dataclasses.fields(options):
        name = RENAMED.get(field.name, field.name)
        if name in params and params[name].default is not inspect.Parameter.empty:
            assert params[name].default is field.default or params[name].default == field.default, (function, name)
    assert any(RENAMED.get(f.name, f.name) in params for f in dataclasses.fields(options))


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_a_flag_left_out_takes_the_dataclass_default_and_the_parser_states_none(command):
    args = build_parser().parse_args([command, *REQUIRED[command]])
    for field in dataclasses.fields(OPTIONS[command]):
        assert getattr(args, field.name) is None, field.name
    assert from_args(OPTIONS[command], args) == OPTIONS[command]()
    if command in ("select", "logits", "reshard", "ingest"):
        assert from_args(TaskOptions, args) == TaskOptions()


def test_the_gallery_default_is_the_same_for_the_cli_and_the_stage_function():
    args = build_parser().parse_args(["select", *REQUIRED["select"]])
    assert from_args(SelectOptions, args).gallery == inspect.signature(select).parameters["gallery"].default == 0


def test_training_flags_left_out_give_the_trainconfig_defaults():
    args = build_parser().parse_args(["train", "--train", "M", "--out", "O"])
    assert config_from_args(args) == TrainConfig()
    given = build_parser().parse_args(["train", "--train", "M", "--out", "O", "--lr", "0.3", "--no-augment"])
    assert config_from_args(given) == dataclasses.replace(TrainConfig(), lr=0.3, augment=None)
