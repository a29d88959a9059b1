"""The model kinds' table (revbits.train.kinds): every registered model has a task with a default data
set and help text, and the command line's choices and help are read from the table."""

from __future__ import annotations

import pytest

from revbits.data.registry import names as data_names
from revbits.models import list_models
from revbits.train import TrainConfig
from revbits.train.commands import registry_help
from revbits.train.kinds import kind_names, model_kind, petra_kinds


def test_every_registered_model_has_a_kind_with_its_entries():
    assert set(list_models()) <= set(kind_names())
    assert set(kind_names()) - set(list_models()) == {"hf"}  # fine-tuning a Hugging Face model
    for name in kind_names():
        kind = model_kind(name)
        assert kind.task.name == name
        assert kind.data in data_names(), name
        assert kind.help, name
        if name != "hf":
            assert TrainConfig(model=name).data == kind.data


def test_help_and_choices_come_from_the_table():
    from revbits.cli import build_parser

    help_of = registry_help()
    for name in kind_names():
        assert f"{name} ({model_kind(name).help})" in help_of["model"]
        assert f"{name} {model_kind(name).data}" in help_of["data"]
        assert name in help_of["memory"]
    assert all(name in help_of["parallel"] for name in petra_kinds())
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model", "no-such-model"])


def test_petra_trains_the_kinds_with_a_cut():
    from revbits.train.petra import check_petra_config

    assert petra_kinds() == ["revnet", "vit"]
    with pytest.raises(ValueError, match="--parallel petra trains revnet, vit models so far, not gpt"):
        check_petra_config(TrainConfig(model="gpt", parallel="petra"))
    most = model_kind("vit").petra.most_stages(TrainConfig(model="vit", n_layer=3))
    with pytest.raises(ValueError, match=f"more than the {most} stages vit"):
        check_petra_config(TrainConfig(model="vit", n_layer=3, stages=most + 1, parallel="petra"))
