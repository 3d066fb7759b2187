"""convert and measure run with a short GIL switch interval, and give the previous one back."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from qtbuild.cli.app import cli
from qtbuild.convert import pipeline
from qtbuild.convert.gil import SWITCH_INTERVAL, short_gil_switches

from helpers.imagefactory import default_config, file, make_tar, write_oci_layout


@pytest.fixture
def default_interval():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(previous)


def test_the_interval_is_set_for_the_block_and_restored(default_interval):
    with short_gil_switches():
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_a_shorter_interval_already_set_is_kept(default_interval):
    sys.setswitchinterval(0.0001)
    with short_gil_switches():
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)


def test_it_is_restored_when_the_block_fails(default_interval):
    with pytest.raises(RuntimeError), short_gil_switches():
        raise RuntimeError("boom")
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.parametrize("command", ["measure", "convert"])
def test_layers_are_flattened_and_the_ramdisk_written_with_the_short_interval(tmp_path, monkeypatch, command,
                                                                              default_interval):
    write_oci_layout(tmp_path / "img", [make_tar([file("bin/app", b"#!/bin/sh\n")])],
                     default_config(cmd=["/bin/app"]))
    seen = []
    flatten, write_eif = pipeline.flatten, pipeline.write_eif
    monkeypatch.setattr(pipeline, "flatten", lambda *a, **k: seen.append(sys.getswitchinterval()) or flatten(*a, **k))
    monkeypatch.setattr(pipeline, "write_eif",
                        lambda *a, **k: seen.append(sys.getswitchinterval()) or write_eif(*a, **k))
    output = ["-o", str(tmp_path / "out.eif")] if command == "convert" else []
    result = CliRunner().invoke(cli, [command, f"oci:{tmp_path / 'img'}", "-q", *output])
    assert result.exit_code == 0, result.output
    assert seen == [pytest.approx(SWITCH_INTERVAL)] * 2
    assert sys.getswitchinterval() == pytest.approx(0.005)
