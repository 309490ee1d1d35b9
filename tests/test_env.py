"""The ATTENTION_ZOO_* switches: one parser (attention_zoo/env.py), and the switches that use it."""
from __future__ import annotations

import pathlib

import pytest

from attention_zoo.env import env_flag
from attention_zoo.errors import UserError
from attention_zoo.ops import batch_threads
from attention_zoo.ops.selection import cpu_fused


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                           ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_switch_words(monkeypatch, raw, expected):
    monkeypatch.setenv("ATTENTION_ZOO_TEST_SWITCH", raw)
    assert env_flag("ATTENTION_ZOO_TEST_SWITCH", default=not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default(monkeypatch, default):
    monkeypatch.delenv("ATTENTION_ZOO_TEST_SWITCH", raising=False)
    assert env_flag("ATTENTION_ZOO_TEST_SWITCH", default) is default
    monkeypatch.setenv("ATTENTION_ZOO_TEST_SWITCH", "")
    assert env_flag("ATTENTION_ZOO_TEST_SWITCH", default) is default


def test_anything_else_is_an_error_naming_variable_value_and_words(monkeypatch):
    monkeypatch.setenv("ATTENTION_ZOO_TEST_SWITCH", "garbage")
    with pytest.raises(UserError, match=r"ATTENTION_ZOO_TEST_SWITCH='garbage': expected 1/true/yes/on or "
                                        r"0/false/no/off \(unset: on\)"):
        env_flag("ATTENTION_ZOO_TEST_SWITCH", default=True)


def test_cpu_kernel_switch_off_by_any_false_word_and_a_typo_refused(monkeypatch):
    """`ATTENTION_ZOO_CPU_KERNEL=off` meant enabled (only "0" turned it off)."""
    monkeypatch.setattr(cpu_fused, "_state", {})  # decided again here; the process's own decision is restored
    monkeypatch.setenv(cpu_fused.KERNEL_ENV, "off")
    assert cpu_fused.kernel() is None and cpu_fused.refusal() == "ATTENTION_ZOO_CPU_KERNEL=off"
    monkeypatch.setattr(cpu_fused, "_state", {})
    monkeypatch.setenv(cpu_fused.KERNEL_ENV, "of")
    with pytest.raises(UserError, match="ATTENTION_ZOO_CPU_KERNEL='of'"):
        cpu_fused.kernel()


def test_batch_split_switch(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the tests run single-threaded
    monkeypatch.setenv(batch_threads.SPLIT_ENV, "false")
    assert batch_threads.batch_workers(4, torch.device("cpu")) == 1
    monkeypatch.setenv(batch_threads.SPLIT_ENV, "true")
    assert batch_threads.batch_workers(4, torch.device("cpu")) == 3
    monkeypatch.setenv(batch_threads.SPLIT_ENV, "maybe")
    with pytest.raises(UserError, match="ATTENTION_ZOO_SPLIT_BACKWARD='maybe'"):
        batch_threads.batch_workers(4, torch.device("cpu"))


def test_the_cli_checks_every_setting_before_any_work(monkeypatch, capsys, tmp_path):
    """A bad switch was read only where its code ran (after a run had written its folder, or never: a vanilla
    model never asks for the CPU kernel), and a mistyped name was ignored. Now: one message, exit 2, first."""
    from attention_zoo.cli import main

    monkeypatch.setenv("ATTENTION_ZOO_CPU_KERNEL", "maybe")
    monkeypatch.setenv("ATTENTION_ZOO_SPLIT_BACKWARDS", "0")
    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vanilla.yaml"
    code = main(["train", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "run").exists()
    assert "ATTENTION_ZOO_CPU_KERNEL='maybe': expected 1/true/yes/on" in err
    assert "ATTENTION_ZOO_SPLIT_BACKWARDS: no such setting; did you mean 'ATTENTION_ZOO_SPLIT_BACKWARD'" in err


def test_test_plugins_is_a_known_setting_and_its_module_names_are_checked(monkeypatch, capsys):
    """ATTENTION_ZOO_TEST_PLUGINS (read by tests/conftest.py) must not make the CLI refuse to start when set."""
    from attention_zoo.cli import main
    from attention_zoo.env import check_environment, module_list

    monkeypatch.setenv("ATTENTION_ZOO_TEST_PLUGINS", " my_alibi, pkg.variants ,")
    check_environment()
    assert module_list("ATTENTION_ZOO_TEST_PLUGINS") == ["my_alibi", "pkg.variants"]
    monkeypatch.setenv("ATTENTION_ZOO_TEST_PLUGINS", "my-alibi,ok")
    assert main(["list", "vanilla"]) == 2
    assert "ATTENTION_ZOO_TEST_PLUGINS: 'my-alibi' not a module name" in capsys.readouterr().err


def test_word_settings_are_checked_at_start_and_bench_checks_what_it_hands_its_workers(monkeypatch, capsys, tmp_path):
    """ATTENTION_ZOO_TRITON_SHARED_DQ=bogus passed on a machine that never runs triton (it was checked only where
    read); `bench --env` handed a typo to its worker processes, where nothing read it."""
    from attention_zoo.cli import main

    monkeypatch.setenv("ATTENTION_ZOO_TRITON_SHARED_DQ", "bogus")
    assert main(["list"]) == 2
    assert "ATTENTION_ZOO_TRITON_SHARED_DQ='bogus': expected one of atomic, recompute, fastest" in capsys.readouterr().err
    monkeypatch.setenv("ATTENTION_ZOO_TRITON_SHARED_DQ", "fastest")
    assert main(["list", "vanilla"]) == 0
    capsys.readouterr()
    for item, message in (("ATTENTION_ZOO_CPU_KERNAL=0", "--env: ATTENTION_ZOO_CPU_KERNAL: no such setting; did you mean"),
                          ("ATTENTION_ZOO_CPU_KERNEL=maybe", "--env: ATTENTION_ZOO_CPU_KERNEL='maybe': expected")):
        assert main(["bench", "--env", item, "--out", str(tmp_path / "b")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "b").exists()
