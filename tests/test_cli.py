"""The command line: flags from the config dataclasses (booleans as --x / --no-x, choices, each field's comment in
--help), the hint for a probability given to --top_k."""

import pytest

from dalle_ar.cli import field_comments, parse
from dalle_ar.config import ConfigError, DalleConfig, SampleConfig, TrainConfig, from_dict


def help_text(capsys, *classes) -> str:
    with pytest.raises(SystemExit):
        parse("x", *classes, argv=["--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_choices_and_each_fields_comment(capsys):
    out = help_text(capsys, DalleConfig, TrainConfig)
    assert "--precision {auto,bf16,fp16,fp32}" in out  # a Literal field: its values
    assert "auto: bf16 on CUDA, fp32 on CPU" in out  # the comment after the field in config.py
    assert "caption dropout: train on the all-pad caption with this probability (default: 0.0)" in out
    assert "starting at 2**initial_scale_power" in out  # a comment block above a field
    assert "--compile, --no-compile" in out and "[--rotary | --no-rotary]" in out
    assert field_comments(TrainConfig)["steps"] == "optimizer steps"


def test_booleans_are_flags_and_choices_are_checked(capsys):
    _, cfg = parse("x", TrainConfig, argv=["--compile", "--no-resume", "--no-progress"])
    assert (cfg.compile, cfg.resume, cfg.progress) == (True, False, False)
    _, cfg = parse("x", TrainConfig, argv=[])
    assert (cfg.compile, cfg.resume) == (False, True)
    with pytest.raises(SystemExit):
        parse("x", TrainConfig, argv=["--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="precision must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"):
        from_dict(TrainConfig, {"precision": "fp8"}, source="run.json")


def test_a_probability_given_to_top_k_points_at_top_p(capsys):
    with pytest.raises(SystemExit):
        parse("x", SampleConfig, argv=["--top_k", "0.9"])
    err = capsys.readouterr().err
    assert "--top_k is a number of tokens" in err and "pass --top_p 0.9" in err and "10% of the codebook" in err
    assert parse("x", SampleConfig, argv=["--top_k", "8", "--top_p", "0.9"])[1].top_k == 8
