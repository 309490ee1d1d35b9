"""Third-party variants: entry points, `plugins:` modules, broken plugins, duplicates, lookups.

The plugin packages live in tests/fixtures/ as they would in site-packages (module + *.dist-info with
entry_points.txt), so putting their folder on sys.path is all it takes; nothing is pip-installed.
Registrations made here are undone after each test (the `isolated_registry` fixture).
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attention_zoo import Param, ProjectedAttention, build_model, create_variant, list_variants, load_config, register_variant
from attention_zoo.cli import main as cli_main
from attention_zoo.config import ConfigError
from attention_zoo.registry import RegistryError
from attention_zoo.variant import LayerShape, bias_call, run_check

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PLUGIN, BROKEN = FIXTURES / "zoo_plugin", FIXTURES / "broken_plugin"
BUILTINS = ["cross_layer_selective", "gqa", "residual", "selective", "vanilla"]


def rediscover(registry, monkeypatch, folder):
    """Put a plugin folder on sys.path and make the registry scan entry points again."""
    monkeypatch.syspath_prepend(str(folder))
    registry._loaded = False
    return registry.names()


def small_model(attention: dict, **top) -> dict:
    return {**top, "model": {"vocab_size": 32, "dim": 32, "depth": 2, "heads": 4, "max_seq_len": 16, "attention": attention}}


def test_entry_point_variant_shows_up_in_list(run_cli):
    result = run_cli("list", path=(PLUGIN,))
    assert result.returncode == 0, result.stderr
    assert "local_window: Sliding-window attention" in result.stdout
    assert "window (int, default 4): keys each query sees" in result.stdout
    for name in BUILTINS:
        assert f"\n{name}: " in f"\n{result.stdout}"


def test_list_plugins_shows_a_plugins_module_variant_and_names_one_that_fails(run_cli):
    """`list --plugins MOD[,MOD]` (repeatable) imports them first, as a config's `plugins:` does."""
    assert "zoo_yaml_variant" not in run_cli("list", "zoo_*", path=(PLUGIN,)).stdout
    result = run_cli("list", "zoo_*", "--plugins", "zoo_yaml_plugin", path=(PLUGIN,))
    assert result.returncode == 0, result.stderr
    assert "zoo_yaml_variant: Plain causal attention, registered by a `plugins:` module." in result.stdout
    assert "    kv_heads (int or null, default None): key/value heads (GQA)" in result.stdout  # its Params rendered
    result = run_cli("list", "--plugins", "zoo_yaml_plugin,zoo_missing_module", "--plugins", "zoo_broken_plugin",
                     path=(PLUGIN, BROKEN))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("attention-zoo list: error: --plugins: plugin module 'zoo_missing_module' cannot be imported "
                              "(ModuleNotFoundError: "), message
    assert "plugin module 'zoo_broken_plugin' cannot be imported" in message and "zoo_yaml_plugin'" not in message


def test_entry_point_variant_builds_from_yaml(isolated_registry, monkeypatch, tmp_path):
    assert "local_window" in rediscover(isolated_registry, monkeypatch, PLUGIN)
    path = tmp_path / "window.yaml"
    path.write_text("model:\n  vocab_size: 32\n  dim: 32\n  depth: 2\n  heads: 4\n  max_seq_len: 16\n"
                    "  attention: {variant: local_window, window: 3, kv_heads: 2}\n")
    model = build_model(path)
    assert type(model.blocks[0].attention).__name__ == "LocalWindow" and model.blocks[0].attention.window == 3
    tokens = torch.randint(0, 32, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, 32)
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 32
    # two layers of window 3 see at most 4 tokens back: position 5 no longer depends on token 0
    torch.testing.assert_close(model(changed)[:, 5:], logits[:, 5:])
    with pytest.raises(ConfigError, match=r"model.attention.window = 0: must be >= 1"):
        load_config(small_model({"variant": "local_window", "window": 0}))


def test_plugins_module_from_yaml_is_imported(isolated_registry, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(PLUGIN))
    assert "zoo_yaml_variant" not in list_variants()
    path = tmp_path / "plugin.yaml"
    path.write_text("plugins: [zoo_yaml_plugin]\nmodel: {dim: 32, depth: 1, heads: 4, attention: {variant: zoo_yaml_variant}}\n")
    model = build_model(path)
    assert type(model.blocks[0].attention).__name__ == "ZooYamlVariant"
    assert "zoo_yaml_variant" in list_variants()


def test_broken_plugins_module_is_reported_by_name_and_harmless(isolated_registry, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(BROKEN))
    with caplog.at_level(logging.WARNING):
        config = load_config(small_model({"variant": "vanilla"}, plugins=["zoo_broken_plugin"]))
    assert config["model"]["attention"]["variant"] == "vanilla"  # a config that doesn't need it still works
    assert "zoo_broken_plugin" in caplog.text and "zoo_dependency_that_is_not_installed" in caplog.text
    with pytest.raises(ConfigError) as info:  # one that needs it says why its variant is missing
        load_config(small_model({"variant": "broken_window"}, plugins=["zoo_broken_plugin", "zoo_missing_module"]))
    message = str(info.value)
    assert "unknown variant" in message and "plugins that failed to import" in message
    assert "plugin module 'zoo_broken_plugin'" in message and "plugin module 'zoo_missing_module'" in message


def test_validate_names_a_plugin_that_cannot_be_imported(isolated_registry, monkeypatch, tmp_path, capsys):
    """load_config lets the config load (its layers need no variant of the plugin); `validate` is where a
    mistyped or broken plugin must show: exit 2, the file, the key path, the module and why."""
    monkeypatch.syspath_prepend(str(BROKEN))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**small_model({"variant": "vanilla"}), "plugins": ["math", "zoo_missing_module"]}))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert f"{cfg}: plugins[1] = 'zoo_missing_module': cannot be imported (ModuleNotFoundError: " in out
    assert "plugins[0]" not in out and f"{cfg}: ok" not in out
    cfg.write_text(yaml.safe_dump({**small_model({"variant": "vanilla"}), "plugins": ["math"]}))
    assert cli_main(["validate", str(cfg)]) == 0 and capsys.readouterr().out.strip() == f"{cfg}: ok"


def test_validate_imports_a_failing_plugin_once(isolated_registry, monkeypatch, tmp_path, capsys):
    """validate imported the `plugins:` modules in load_config and again to name the failures: a module that
    fails ran twice (its prints and writes twice). Once now, with the same message and exit code."""
    (tmp_path / "zoo_fails_after_a_side_effect.py").write_text(
        "import pathlib\n"
        "print('zoo_fails_after_a_side_effect: importing')\n"
        "with open(pathlib.Path(__file__).with_name('attempts.txt'), 'a') as f:\n"
        "    f.write('attempt\\n')\n"
        "raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**small_model({"variant": "vanilla"}), "plugins": ["zoo_fails_after_a_side_effect"]}))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert (tmp_path / "attempts.txt").read_text() == "attempt\n" and out.count("importing") == 1
    assert f"{cfg}: plugins[0] = 'zoo_fails_after_a_side_effect': cannot be imported (RuntimeError: boom); train " \
           "would run without it" in out


def test_broken_entry_point_is_reported_by_name_and_harmless(isolated_registry, monkeypatch, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        names = rediscover(isolated_registry, monkeypatch, BROKEN)
    assert set(BUILTINS) <= set(names) and "broken_window" not in names
    assert "broken_window" in caplog.text and "zoo_broken_plugin" in caplog.text
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "vanilla: " in out and "plugin not loaded: entry point broken_window = zoo_broken_plugin" in out
    build_model(small_model({"variant": "selective"}))
    with pytest.raises(ConfigError, match=r"plugins that failed to import: entry point broken_window"):
        load_config(small_model({"variant": "broken_window"}))


def test_a_builtin_module_that_fails_to_import_is_tried_again_not_left_half_registered(tmp_path, monkeypatch):
    """A registry whose built-in module raised on import (a bug, or Ctrl-C mid-import) raises that error again on
    the next lookup instead of answering from a partial registry ("unknown name" for what is only unloaded)."""
    from attention_zoo.registry import Registry

    (tmp_path / "zoo_flaky_builtin.py").write_text(
        "import os\nfrom attention_zoo.registry import REG\n"
        "if os.environ.get('ZOO_FLAKY') == '1':\n    raise RuntimeError('flaky import')\nREG.add('thing', 1)\n")
    import attention_zoo.registry as registry_module

    registry = Registry("thing", builtin_modules=("zoo_flaky_builtin",))
    monkeypatch.setattr(registry_module, "REG", registry, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ZOO_FLAKY", "1")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="flaky import"):
            registry.names()
        sys.modules.pop("zoo_flaky_builtin", None)
    monkeypatch.setenv("ZOO_FLAKY", "0")
    assert registry.names() == ["thing"]


def test_duplicate_registration_names_both_definitions(isolated_registry):
    with pytest.raises(RegistryError) as info:
        @register_variant("selective")
        class Impostor(ProjectedAttention):
            """Same name as a built-in."""

    message = str(info.value)
    assert "duplicate variant 'selective'" in message
    assert "attention_zoo.variants.selective.Selective" in message and "selective.py" in message  # the first definition
    assert "Impostor" in message and "test_plugins.py" in message  # the second one
    assert create_variant("selective").__class__.__name__ == "Selective"  # the original is kept


def test_duplicate_in_a_plugin_module_is_reported(isolated_registry, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(PLUGIN))
    with caplog.at_level(logging.WARNING):
        load_config(small_model({"variant": "vanilla"}, plugins=["zoo_duplicate_plugin"]))
    assert "zoo_duplicate_plugin" in caplog.text
    assert "attention_zoo.variants.vanilla.Vanilla" in caplog.text and "AnotherVanilla" in caplog.text


TWICE = """
from attention_zoo import ProjectedAttention, register_variant


@register_variant("zoo_twice")
class Twice(ProjectedAttention):
    \"\"\"A plug-in whose file is imported twice.\"\"\"

    params = {}
"""


def load_file_as(path: Path, module_name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import does (isolated_registry removes zoo_* modules)
    spec.loader.exec_module(module)
    return module


def test_one_definition_imported_under_two_module_names_is_no_duplicate(isolated_registry, tmp_path):
    """The same file, line and qualified name registered again (a reload, or a script run as __main__ that
    lists itself under plugins:) replaces the entry; another definition under the name is still a clash."""
    path = tmp_path / "zoo_twice.py"
    path.write_text(TWICE)
    first = load_file_as(path, "zoo_twice_as_main")
    second = load_file_as(path, "zoo_twice")  # no RegistryError
    assert first.Twice is not second.Twice
    assert list_variants("zoo_twice") == ["zoo_twice"] and isolated_registry.get("zoo_twice") is second.Twice
    other = tmp_path / "zoo_other.py"
    other.write_text("\n" + TWICE)  # the same class one line further down: another definition
    with pytest.raises(RegistryError, match=r"duplicate variant 'zoo_twice'.*zoo_twice.py:5.*zoo_other.py:6"):
        load_file_as(other, "zoo_other")


def test_a_script_that_lists_itself_as_a_plugin_logs_no_duplicate(tmp_path):
    """The reported case end to end: `python zoo_script.py`, whose config lists zoo_script under plugins:."""
    import subprocess

    script = tmp_path / "zoo_script.py"
    script.write_text(TWICE + """
if __name__ == "__main__":
    from attention_zoo import build_model

    build_model({"plugins": ["zoo_script"], "model": {"dim": 32, "depth": 1, "heads": 4,
                                                       "attention": {"variant": "zoo_twice"}}})
    print("built")
""")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "built" in result.stdout and "duplicate" not in result.stderr + result.stdout


def test_a_variant_must_declare_params(isolated_registry):
    with pytest.raises(TypeError, match=r"must declare `params"):
        register_variant("zoo_no_params")(type("NoParams", (torch.nn.Module,), {}))


def test_unknown_name_lists_close_matches():
    with pytest.raises(RegistryError) as info:
        create_variant("selectiv")
    assert "unknown variant 'selectiv'" in str(info.value) and "did you mean 'selective'" in str(info.value)
    assert "known: " + ", ".join(list_variants()) in str(info.value)


def test_create_variant_reports_every_bad_parameter():
    with pytest.raises(ValueError) as info:
        create_variant("selective", heads=4, kv_heads=3, selection_head=4, colour="red")
    message = str(info.value)
    assert "kv_heads = 3" in message and "selection_head = 4" in message and "colour = 'red'" in message


@pytest.mark.parametrize("pattern,expected", [
    ("sel*", ["selective"]),
    ("*selective", ["cross_layer_selective", "selective"]),
    ("?qa", ["gqa"]),
    ("nothing*", []),
])
def test_list_variants_wildcards(pattern, expected):
    assert list_variants(pattern) == expected


def test_list_variants_default_is_everything_sorted():
    names = list_variants()
    assert names == sorted(names) and set(BUILTINS) <= set(names) and list_variants("*") == names


def _register_sigmoid_attention():
    """Sigmoid attention (Ramapuram et al., 2024): sigmoid(scale q k^T + b) v under the causal mask, no
    softmax, so no backend can run it: the variant computes it in its own attend()."""

    @register_variant("zoo_sigmoid")
    class SigmoidAttention(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attend(self, q, k, v, bias):
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))  # GQA: kv head per query head
            Nq, Nk = q.shape[2], k.shape[2]
            seen = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)  # bottom-right aligned for a cache
            weights = torch.sigmoid(self.scale * q @ k.transpose(-1, -2) - math.log(Nk))
            return (weights * seen) @ v

    return SigmoidAttention


def test_a_variant_with_its_own_attend_is_said_to_bypass_the_backend(isolated_registry, tmp_path, capsys):
    """A variant whose attend() makes no backend call: describe says `backend:` does not apply to it (it crashed
    with an IndexError), train with a named backend says which layers it does not apply to (it said nothing),
    warm_up names those layers."""
    cls = _register_sigmoid_attention()
    model_section = {"vocab_size": 256, "dim": 32, "depth": 3, "heads": 4, "max_seq_len": 32,
                     "attention": {"variant": "vanilla"}, "layers": [{"at": [1], "attention": {"variant": "zoo_sigmoid"}}]}
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(yaml.safe_dump({"backend": "sdpa", "model": model_section}))
    model = build_model(load_config(cfg))
    assert model.warm_up("cpu") == [1]
    x = torch.randn(2, 5, 32)  # the layer against its formula, written out here
    layer = model.blocks[1].attention
    q = layer.q_proj(x).unflatten(-1, (4, 8)).transpose(1, 2)
    k, v = layer.kv_proj(x).unflatten(-1, (2, 4, 8)).permute(2, 0, 3, 1, 4)
    w = torch.sigmoid(q @ k.transpose(-1, -2) / 8 ** 0.5 - torch.log(torch.tensor(5.0))) * torch.ones(5, 5).tril()
    torch.testing.assert_close(layer(x, {})[0], layer.out_proj((w @ v).transpose(1, 2).flatten(2)))

    assert cli_main(["describe", str(cfg)]) == 0
    out = capsys.readouterr().out
    layer_lines = out.split("layer 1:")[1].split("layer 2:")[0]
    assert "none: the variant computes attention in its own attend(), so `backend:` does not apply" in layer_lines
    assert out.count("): sdpa") == 2  # layers 0 and 2

    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({"backend": "sdpa", "model": model_section, "data": {"name": "shakespeare"},
                                         "train": {"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 0,
                                                   "eval_batches": 1, "device": "cpu"}}))
    assert cli_main(["train", str(train_cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    note = (f"note: layer 1 ({cls.__name__}) computes attention in the variant's own attend() and makes no backend "
            "call: backend 'sdpa' applies to the other layers only")
    assert note in capsys.readouterr().out
    # backend auto: nothing to say
    train_cfg.write_text(train_cfg.read_text().replace("backend: sdpa", "backend: auto"))
    assert cli_main(["train", str(train_cfg), "--out", str(tmp_path / "run_auto"), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_bench_notes_a_backend_its_variant_does_not_use(isolated_registry, monkeypatch, tmp_path):
    """bench's backend column would claim `sdpa` ran the sigmoid layers: the point's status says it did not."""
    import json

    from attention_zoo.bench import runner, worker

    _register_sigmoid_attention()
    monkeypatch.setattr(runner, "run_point", lambda point, timeout, env=None: worker.measure_safely(point))
    cfg = tmp_path / "sigmoid.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"attention": {"variant": "zoo_sigmoid"}}}))
    threads = torch.get_num_threads()
    try:
        assert cli_main(["bench", "--variants", f"vanilla,{cfg}", "--backends", "sdpa", "--seq-lens", "16",
                         "--batch", "1", "--dim", "32", "--depth", "1", "--heads", "2", "--head-dim", "16",
                         "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    assert "note" not in rows["vanilla"]
    assert rows["sigmoid"]["note"].startswith("layer 0 (SigmoidAttention) computes attention in the variant's own attend()")
    assert "backend 'sdpa' applies to no layer" in (tmp_path / "out" / "results.md").read_text()


def test_attention_bias_gets_x_and_positions_when_it_names_them(isolated_registry):
    """The layer input and the tokens' absolute positions reach an attention_bias that names them (a bias
    made from the tokens); one with the four-argument form gets neither and keeps working."""
    seen = {}

    @register_variant("zoo_sees_inputs")
    class SeesInputs(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attention_bias(self, q, k, state, cache, positions, x):
            seen.update(x=x, positions=positions.index.clone())
            return None, {}

    @register_variant("zoo_four_arguments")
    class FourArguments(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attention_bias(self, q, k, state, cache):
            return None, {}

    model = build_model(small_model({"variant": "zoo_sees_inputs"}))
    cache = model.new_cache()
    model(torch.randint(0, 32, (2, 3)), cache=cache)
    x = torch.randn(2, 1, 32)
    layer = model.blocks[0].attention
    layer(x, {}, cache=cache.layers[0])
    assert seen["x"] is x and seen["positions"].tolist() == [[3], [3]]  # continues from the cache
    assert bias_call(layer.attention_bias, "SeesInputs").inputs == ("positions", "x")
    assert bias_call(FourArguments(LayerShape(32, 4, 8)).attention_bias, "FourArguments").inputs == ()
    build_model(small_model({"variant": "zoo_four_arguments"}))(torch.randint(0, 32, (1, 4)))


def test_positional_only_x_and_positions_are_passed_by_position():
    """A positional-only `x` (or `positions`) got the input as a keyword: TypeError at the first forward. They
    go by position, in their order, right after (q, k, state, cache); `positions` after a `/` by name."""
    seen = []

    class XOnly(ProjectedAttention):
        def attention_bias(self, q, k, state, cache, x, /):
            seen.append(("XOnly", x))
            return None, {}

    class Both(ProjectedAttention):
        def attention_bias(self, q, k, state, cache, positions, x, /):
            seen.append(("Both", positions.index, x))
            return None, {}

    class Mixed(ProjectedAttention):
        def attention_bias(self, query, key, st, c, x, /, *, positions):  # the four named otherwise
            seen.append(("Mixed", x, positions.index))
            return None, {}

    x = torch.randn(2, 3, 32)
    for cls in (XOnly, Both, Mixed):
        cls(LayerShape(32, 4, 8))(x, {})
    (_, x1), (_, p2, x2), (_, x3, p3) = seen
    assert x1 is x and x2 is x and x3 is x and p2.tolist() == p3.tolist() == [[0, 1, 2]] * 2


def test_a_positional_only_parameter_forward_cannot_fill_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match=r"Extra\.attention_bias\(self, q, k, state, cache, scale, x, /\): "
                                        r"positional-only 'scale' comes before the positional-only 'x'"):
        class Extra(ProjectedAttention):
            def attention_bias(self, q, k, state, cache, scale, x, /):
                return None, {}

    class Trailing(ProjectedAttention):  # one after the inputs keeps its default, as before
        def attention_bias(self, q, k, state, cache, x, scale=2.0, /):
            return x.new_full((1, 1, 1, 1), -scale), {}

    Trailing(LayerShape(32, 4, 8))(torch.randn(1, 2, 32), {})


def test_an_input_named_in_the_place_of_cache_is_refused_when_the_class_is_made():
    """`attention_bias(self, q, k, state, positions)` (cache left out) got the cache, or None, as `positions`,
    silently: the four leading parameters are filled by position whatever their names."""
    with pytest.raises(TypeError, match=r"NoCache\.attention_bias\(self, q, k, state, positions\): 'positions' "
                                        r"sits where 'cache' is passed"):
        class NoCache(ProjectedAttention):
            def attention_bias(self, q, k, state, positions):
                return None, {}

    def on_instance(q, k, x):  # an instance attribute: no self, and state and cache left out
        return None, {}

    layer = ProjectedAttention(LayerShape(32, 4, 8))
    layer.attention_bias = on_instance
    with pytest.raises(TypeError, match=r"'x' sits where 'state' is passed"):
        layer(torch.randn(1, 2, 32), {})


def test_attention_bias_set_after_the_class_is_made_or_on_an_instance_is_read():
    """The inputs an attention_bias names were read once, when its class was made: one set on the class later,
    or on an instance, got neither and failed (missing `x`)."""
    seen = {}

    class Later(ProjectedAttention):
        pass

    def on_class(self, q, k, state, cache, x):
        seen["class"] = x
        return None, {}

    def on_instance(q, k, state, cache, positions):  # an instance attribute: not bound, no self
        seen["instance"] = positions.index
        return None, {}

    Later.attention_bias = on_class
    x = torch.randn(1, 2, 32)
    layer = Later(LayerShape(32, 4, 8))
    layer(x, {})
    assert seen["class"] is x
    layer.attention_bias = on_instance
    layer(x, {})
    assert seen["instance"].tolist() == [[0, 1]] and Later(LayerShape(32, 4, 8)).attention_bias.__func__ is on_class


def test_describe_plans_each_call_of_a_layer_whose_calls_differ(isolated_registry, tmp_path, capsys):
    """describe planned a layer's first call only; calls of different value widths are refused for different
    reasons (or sent to different backends), so each is said."""
    from attention_zoo.backends import dispatch

    @register_variant("zoo_two_calls")
    class TwoCalls(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attend(self, q, k, v, bias):
            narrow = dispatch(q, k, v, bias=bias, causal=True, scale=self.scale, backend=self.backend)
            wide = dispatch(q, k, torch.cat([v, v], -1), bias=bias, causal=True, scale=self.scale, backend=self.backend)
            return narrow + wide[..., : v.shape[-1]]

    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(small_model({"variant": "zoo_two_calls"})))
    assert cli_main(["describe", str(cfg)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "2 calls" in x][0]
    assert "call 1: sdpa" in line and "call 2: sdpa" in line and "values of width 16 differ" in line.split("call 2")[1]


def test_a_variant_keeps_its_own_init_through_init_weights(isolated_registry):
    """build_model draws every Linear from GPT-2's init after the layers exist, so a gate bias set to 5 in
    __init__ comes back 0; set in init_weights() (run after that draw) it stays 5, and only where asked."""
    from torch import nn

    @register_variant("zoo_gated")
    class Gated(ProjectedAttention):
        """A per-head gate whose bias starts at 5 (gate open)."""
        params = ProjectedAttention.params

        def __init__(self, shape, **base):
            super().__init__(shape, **base)
            self.gate = nn.Linear(shape.dim, shape.heads)
            nn.init.constant_(self.gate.bias, 5.0)  # what GPT-2's init, run after every layer exists, redraws

        def init_weights(self):
            nn.init.constant_(self.gate.bias, 5.0)

    @register_variant("zoo_gated_naive")
    class NaiveGated(Gated):
        """The same with its init in __init__ only."""
        init_weights = None

    model = build_model(small_model({"variant": "zoo_gated"}))
    for block in model.blocks:
        assert torch.equal(block.attention.gate.bias, torch.full((4,), 5.0))
        assert 0.015 < block.attention.gate.weight.std().item() < 0.025  # the weight keeps GPT-2's N(0, 0.02)
    assert torch.equal(create_variant("zoo_gated", dim=32, heads=4).gate.bias, torch.full((4,), 5.0))
    naive = build_model(small_model({"variant": "zoo_gated_naive"}))  # no hook: GPT-2's init zeroes the bias
    assert torch.equal(naive.blocks[0].attention.gate.bias, torch.zeros(4))


def test_a_variant_sees_the_models_max_seq_len(isolated_registry):
    """LayerShape.max_seq_len is model.max_seq_len, in the Param check and in __init__ (a length-aware init such
    as sigmoid attention's b = -log(n)); a layer built on its own gets the config default unless told."""
    seen = []

    @register_variant("zoo_length_aware")
    class LengthAware(ProjectedAttention):
        """Records the max_seq_len its shape carries."""
        params = {"b": Param(float, None, "bias; null: -log(max_seq_len)",
                             check=lambda value, shape: seen.append(("check", shape.max_seq_len)))}

        def __init__(self, shape, *, b=None, **base):
            super().__init__(shape, **base)
            seen.append(("init", shape.max_seq_len))
            self.b = -math.log(shape.max_seq_len) if b is None else b

    model = build_model(small_model({"variant": "zoo_length_aware", "b": -1.0}))  # max_seq_len: 16
    assert set(seen) == {("check", 16), ("init", 16)}  # validation may build layers on meta too
    assert model.blocks[0].attention.b == -1.0
    assert build_model(small_model({"variant": "zoo_length_aware"})).blocks[1].attention.b == -math.log(16)
    assert create_variant("zoo_length_aware", dim=32, heads=4).shape.max_seq_len == 1024
    assert create_variant("zoo_length_aware", dim=32, heads=4, max_seq_len=64).b == -math.log(64)


def test_bench_takes_plugins_so_variants_may_name_their_variants(isolated_registry, monkeypatch, tmp_path, capsys):
    """`bench --variants sigmoid_attn` (a plug-in's registered name) was an unknown variant: bench had no
    --plugins, only a YAML file listing them worked. The worker gets the modules with the point's config."""
    import json

    from attention_zoo.bench import runner, worker

    (tmp_path / "zoo_bench_plugin.py").write_text(
        "from attention_zoo import ProjectedAttention, register_variant\n\n\n"
        "@register_variant('zoo_bench_variant')\nclass BenchVariant(ProjectedAttention):\n"
        "    '''A plug-in variant for the bench test.'''\n    params = ProjectedAttention.params\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    monkeypatch.setattr(runner, "run_point", lambda point, timeout, env=None: seen.append(point) or worker.measure_safely(point))
    args = ["bench", "--variants", "zoo_bench_variant", "--backends", "sdpa", "--seq-lens", "8", "--batch", "1", "--dim",
            "16", "--depth", "1", "--heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert cli_main([*args, "--out", str(tmp_path / "nope")]) == 2
        assert "--variants: unknown variant 'zoo_bench_variant'" in capsys.readouterr().err
        assert cli_main([*args, "--plugins", "zoo_no_such_module", "--out", str(tmp_path / "nope")]) == 2
        assert "--plugins: plugin module 'zoo_no_such_module' cannot be imported" in capsys.readouterr().err
        assert cli_main([*args, "--plugins", "zoo_bench_plugin", "--out", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    assert rows["zoo_bench_variant"]["status"] == "ok"
    from attention_zoo.bench.points import model_config
    point = [p for p in seen if p.variant.label == "zoo_bench_variant"][0]
    assert model_config(point)["plugins"] == ["zoo_bench_plugin"]  # what the worker process imports
    assert type(point).from_json(json.loads(json.dumps(point.to_json()))) == point  # as the worker receives it


def _broken_contract_variants() -> dict[str, tuple[type, str]]:
    """Variants that break the attention_bias / state contract, each with a phrase the problem must contain."""
    from attention_zoo import SeparableBias

    class LongBias(ProjectedAttention):
        def attention_bias(self, q, k, state, cache):
            return torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2] + 3, device=q.device), {}

    class ShortColumn(ProjectedAttention):
        def attention_bias(self, q, k, state, cache):
            return SeparableBias(torch.zeros(1, 1, k.shape[2] - 1, device=q.device)), {}

    class BiasOnCPU(ProjectedAttention):  # works on a CPU-only machine, fails on any GPU: found on meta
        def attention_bias(self, q, k, state, cache):
            return SeparableBias(torch.zeros(1, 1, k.shape[2])), {}

    class UndeclaredState(ProjectedAttention):
        writes = ("zoo_not_a_channel",)

        def attention_bias(self, q, k, state, cache):
            return None, {"zoo_not_a_channel": torch.zeros(q.shape[0], device=q.device)}

    return {"zoo_long_bias": (LongBias, "does not broadcast to (B, H, Nq, Nk) = (1, 4, 16, 16)"),
            "zoo_short_column": (ShortColumn, "SeparableBias.col must be a floating (B or 1, H or 1, 16) tensor"),
            "zoo_bias_on_cpu": (BiasOnCPU, "must be on its inputs' device, e.g. device=q.device"),
            "zoo_undeclared_state": (UndeclaredState, "which no declare_channel declared")}


@pytest.mark.parametrize("name", list(_broken_contract_variants()))
def test_validate_and_describe_report_a_variant_that_breaks_its_contract(name, isolated_registry, tmp_path, capsys):
    """A plug-in whose attention_bias returns a bias of the wrong shape or device, or writes state no channel
    declares, passed `validate` and failed a training run's first step with a traceback (exit 1). Both commands
    run the model once on the meta device: one problem at the key path that chose the variant, naming the
    layer, the class and what it did; exit 2, no traceback."""
    cls, phrase = _broken_contract_variants()[name]
    cls.params = {**ProjectedAttention.params}
    register_variant(name)(cls)
    config = small_model({"variant": "vanilla"})
    config["model"]["layers"] = [{"at": 1, "attention": {"variant": name}}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    for command in ("validate", "describe"):
        assert cli_main([command, str(cfg)]) == 2
        captured = capsys.readouterr()
        line = [x for x in (captured.out + captured.err).splitlines() if "layer 1" in x][0]
        assert f"c.yaml: model.layers[0].attention.variant = {name!r}: layer 1 (" in line, line
        assert cls.__qualname__ in line and "on the meta device" in line and phrase in line, line
    if name == "zoo_bias_on_cpu":  # right on a CPU, where train runs here; its warm-up on a GPU finds it
        return
    # train finds it in its two-token warm-up on the real device, before the run folder is written
    config["train"] = {"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 0}
    config["model"]["vocab_size"] = 256
    cfg.write_text(yaml.safe_dump(config))
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"model.layers[0].attention.variant = {name!r}: layer 1 (" in err and "first forward" in err, err
    assert not (tmp_path / "run").exists()


def test_a_failure_of_the_zoos_own_code_keeps_its_traceback(monkeypatch, tmp_path):
    """Only a plug-in's failure becomes a config problem; one inside a built-in variant is the zoo's bug and is
    raised as it is."""
    from attention_zoo.variant_registry import get_variant

    def broken(self, q, k, state, cache):
        raise RuntimeError("a bug in the zoo")

    monkeypatch.setattr(get_variant("vanilla"), "attention_bias", broken)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_model({"variant": "vanilla"})))
    with pytest.raises(RuntimeError, match="a bug in the zoo"):
        cli_main(["validate", str(cfg)])


def test_validate_reports_a_broken_component_at_its_key_and_with_the_other_problems(tmp_path, capsys):
    """A broken plug-in component (here an MLP that skips its up projection) is named at its model key; validate
    reports it together with what `train` would check (a seq_len over max_seq_len), not one at a time."""
    from attention_zoo.components import MLPS
    from attention_zoo.components.mlps import GELU

    @MLPS.register("zoo_narrow_mlp")
    class Narrow(GELU):
        def forward(self, x):
            return self.down(x)  # (B, N, dim) into a Linear(hidden, dim)

    try:
        config = small_model({"variant": "vanilla"}, train={"seq_len": 64})
        config["model"].update(mlp="zoo_narrow_mlp", vocab_size=256)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli_main(["validate", str(cfg)]) == 2
        out = capsys.readouterr().out
        assert "2 problems in config" in out, out
        assert "c.yaml: model.mlp = 'zoo_narrow_mlp': module blocks.0.mlp (" in out and "Narrow" in out, out
        assert f"(at {__file__}:" in out, out  # the plug-in's own line that called into what raised
        assert cli_main(["-v", "validate", str(cfg)]) == 2  # -v: the plug-in's traceback too
        assert "Traceback (most recent call last)" in capsys.readouterr().err
        assert "c.yaml: train.seq_len = 64: longer than model.max_seq_len (16)" in out, out
    finally:
        del MLPS.registry._entries["zoo_narrow_mlp"]


def test_a_plugin_that_recovers_from_its_own_submodules_failure_is_still_named(isolated_registry, tmp_path, capsys):
    """A variant that tries a submodule and falls back when it raises left that submodule on the dry run's stack of
    running modules (a raise skips its forward hook), and every later hook popped the wrong name: the variant's
    real failure (state no channel declares, checked once its block returned) went out as a traceback."""

    @register_variant("zoo_fallback")
    class Fallback(ProjectedAttention):
        params = {**ProjectedAttention.params}
        writes = ("zoo_not_a_channel",)

        def __init__(self, shape, **base):
            super().__init__(shape, **base)
            self.fast = torch.nn.Module()  # a fast path this input does not take: it raises, the variant goes on

        def attention_bias(self, q, k, state, cache):
            try:
                self.fast(q)  # Module.forward is not implemented
            except NotImplementedError:
                pass
            return None, {"zoo_not_a_channel": torch.zeros(q.shape[0], device=q.device)}

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_model({"variant": "zoo_fallback"})))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "c.yaml: model.attention.variant = 'zoo_fallback': layer 0 (" in out and "no declare_channel" in out, out


@pytest.mark.parametrize("method", ["prepare", "embed", "rotate"])
def test_a_broken_position_plugin_is_named_at_model_position(method, tmp_path, capsys):
    """A positional scheme's prepare / embed / rotate are called as methods (by the stack, and rotate inside each
    attention layer), never through Module.__call__, so no hook saw them: a plug-in scheme that raised there
    went out as a traceback (or, for rotate, was blamed on the layer's variant)."""
    from attention_zoo.components import POSITIONS
    from attention_zoo.components.positions import PositionalScheme
    from attention_zoo.dry_run import plugin_failures_reported

    def broken(self, *args):
        raise RuntimeError(f"{method} is broken")

    POSITIONS.register("zoo_broken_position")(type("BrokenPosition", (PositionalScheme,), {method: broken}))
    try:
        config = small_model({"variant": "vanilla"})
        config["model"]["position"] = "zoo_broken_position"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        for command in ("validate", "describe"):
            assert cli_main([command, str(cfg)]) == 2
            captured = capsys.readouterr()
            text = captured.out + captured.err
            assert "Traceback" not in text
            assert "c.yaml: model.position = 'zoo_broken_position': module position_embedding (" in text, text
            assert f"BrokenPosition): the model's forward on the meta device (1 x 16 tokens) raised RuntimeError: " \
                   f"{method} is broken" in text, text
        model = build_model(config)  # what the dry run put on the model is gone after a failure
        with pytest.raises(ConfigError):
            with plugin_failures_reported(load_config(config), model, "a test forward"):
                model(torch.zeros(1, 4, dtype=torch.long))
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert method not in vars(model.position_embedding)
    finally:
        del POSITIONS.registry._entries["zoo_broken_position"]


def test_a_plugin_that_reads_tensor_values_gets_the_meta_advice_not_the_device_one(isolated_registry, tmp_path, capsys):
    """A variant whose attend() reads a value (.item()) cannot run on the meta device; the problem told it to make
    its tensors on its inputs' device (the advice for a CPU-made tensor), which it already does and which does not
    help. It is told what docs/adding-a-variant.md says: give the forward a path for the meta device."""

    @register_variant("zoo_reads_values")
    class ReadsValues(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attend(self, q, k, v, bias):
            return super().attend(q, k, v, bias) / float(q.abs().max().item())

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_model({"variant": "zoo_reads_values"})))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "raised RuntimeError: Tensor.item() cannot be called on meta tensors" in out, out
    assert "device=q.device" not in out, out
    assert "it reads tensor values, which the meta device does not hold: give its forward a path for it " \
           "(if q.device.type == \"meta\": return a tensor of the output's shape)" in out, out


def test_a_plugin_that_fails_only_with_gradients_on_is_found_before_training(isolated_registry, tmp_path, capsys):
    """A variant that clamps its own parameter in place in its forward runs without gradients (validate's dry run,
    train's warm-up) and fails with them: validate said ok, and train wrote its run folder and died at its first
    step with a traceback. validate of a training config runs the dry run with gradients on, as train's steps do,
    and so does train's warm-up: one problem, exit 2, no run folder."""

    @register_variant("zoo_clamps_in_place")
    class ClampsInPlace(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def __init__(self, shape, **base):
            super().__init__(shape, **base)
            self.slope = torch.nn.Parameter(torch.ones(shape.heads))

        def attention_bias(self, q, k, state, cache):
            self.slope.clamp_(min=0)  # a leaf that requires grad, changed in place: only an error with grad on
            return self.slope[None, :, None, None] * torch.zeros(q.shape[2], k.shape[2], device=q.device), {}

    config = small_model({"variant": "zoo_clamps_in_place"},
                         train={"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 0})
    config["model"]["vocab_size"] = 256
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    phrase = "raised RuntimeError: a leaf Variable that requires grad is being used in an in-place operation"
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "c.yaml: model.attention.variant = 'zoo_clamps_in_place': layer 0 (" in out and phrase in out, out
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.attention.variant = 'zoo_clamps_in_place': layer 0 (" in err and phrase in err, err
    assert not (tmp_path / "run").exists()


def test_a_plugin_check_that_raises_is_a_problem_at_its_key(isolated_registry, tmp_path, capsys):
    """A plug-in's Param check (or a component's check_shape) that raises instead of returning a message went out
    of validate as a traceback (exit 1); it is one problem at the key it checks, naming the check and what it
    raised. A check of the zoo's own that raises is a bug and keeps its traceback."""
    from attention_zoo.components import NORMS
    from attention_zoo.components.norms import RMSNorm

    def positive(value, shape):
        return None if value > 0 else "must be > 0"  # a str value, as YAML gives it quoted: TypeError

    @register_variant("zoo_raising_check")
    class RaisingCheck(ProjectedAttention):
        params = {**ProjectedAttention.params, "gain": Param((int, float, str), 1, "a gain", check=positive)}

        def __init__(self, shape, *, gain=1, **base):
            super().__init__(shape, **base)

    @NORMS.register("zoo_raising_norm")
    class RaisingNorm(RMSNorm):
        @classmethod
        def check_shape(cls, shape):
            return None if shape.dim % shape.bad_name else "odd"  # AttributeError

    try:
        config = small_model({"variant": "zoo_raising_check", "gain": "2"})
        config["model"]["norm"] = "zoo_raising_norm"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli_main(["validate", str(cfg)]) == 2
        out = capsys.readouterr().out
        assert "c.yaml: model.attention.gain = '2': its check (test_plugins." in out and \
               "positive) raised TypeError: '>' not supported between instances of 'str' and 'int'" in out, out
        assert "c.yaml: model.norm = 'zoo_raising_norm': its check (test_plugins." in out and \
               "RaisingNorm.check_shape) raised AttributeError: " in out, out
    finally:
        del NORMS.registry._entries["zoo_raising_norm"]

    def zoo_bug(value, shape):
        raise ValueError("a bug in the zoo's check")

    zoo_bug.__module__ = "attention_zoo.variant"  # as the zoo's own checks are
    with pytest.raises(ValueError, match="a bug in the zoo's check"):
        run_check(zoo_bug, 1, None)


def test_a_norm_plugin_that_returns_another_shape_is_named_not_the_layer_after_it(tmp_path, capsys):
    """A plug-in norm that returns another shape than its input's does not fail itself: the attention layer after
    it does, a built-in, so the problem went out as a traceback blaming the zoo. A plug-in norm or MLP returning
    another shape is the problem, at model.norm / model.mlp."""
    from attention_zoo.components import NORMS
    from attention_zoo.components.norms import RMSNorm

    @NORMS.register("zoo_flattening_norm")
    class Flattening(RMSNorm):
        def forward(self, x):
            return super().forward(x).flatten(1)  # (B, N * dim)

    try:
        config = small_model({"variant": "vanilla"})
        config["model"]["norm"] = "zoo_flattening_norm"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli_main(["validate", str(cfg)]) == 2
        out = capsys.readouterr().out
        assert "c.yaml: model.norm = 'zoo_flattening_norm': module blocks.0.norm_attn (" in out, out
        assert "raised ValueError: returned shape (1, 512) for an input of shape (1, 16, 32); a norm or MLP " \
               "returns its input's shape" in out, out
    finally:
        del NORMS.registry._entries["zoo_flattening_norm"]


_INIT_PLUGIN = '''
import math

import torch
from torch import nn

from attention_zoo.variant import ProjectedAttention
from attention_zoo.variant_registry import register_variant


@register_variant("zoo_init_typo")
class InitTypo(ProjectedAttention):
    params = {**ProjectedAttention.params}

    def __init__(self, shape, **base):
        super().__init__(shape, **base)
        self.scale = nn.Parameter(torch.ones(shape.num_heads))  # LayerShape has `heads`


@register_variant("zoo_init_reads_values")
class InitReadsValues(ProjectedAttention):
    """Its constant computed with torch (float() of a tensor): reads a value, which a meta tensor does not hold."""
    params = {**ProjectedAttention.params}

    def __init__(self, shape, **base):
        super().__init__(shape, **base)
        self.temperature = nn.Parameter(torch.full((shape.heads,), float(torch.log(torch.tensor(2.0)))))
'''


def _init_plugin(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "zoo_init_plugin.py"
    path.write_text(_INIT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_a_plugin_whose_init_fails_is_named_with_its_layer_class_and_line(isolated_registry, monkeypatch, tmp_path,
                                                                          capsys):
    """A plug-in whose __init__ raised was reported as `model.attention: building the layers failed: ...`, without
    the layer, the class or the plug-in's line; now at the key that chose the variant, as a forward failure is."""
    plugin = _init_plugin(tmp_path, monkeypatch)
    line = _INIT_PLUGIN.splitlines().index("        self.scale = nn.Parameter(torch.ones(shape.num_heads))  "
                                           "# LayerShape has `heads`") + 1
    config = small_model({"variant": "vanilla"}, plugins=["zoo_init_plugin"])
    config["model"]["layers"] = [{"at": 1, "attention": {"variant": "zoo_init_typo"}}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert (f"{cfg}: model.layers[0].attention.variant = 'zoo_init_typo': layer 1 (zoo_init_plugin.InitTypo): "
            f"its __init__ raised AttributeError: 'LayerShape' object has no attribute 'num_heads' "
            f"(at {plugin}:{line})") in out, out
    with pytest.raises(ConfigError, match=r"layer 1 \(zoo_init_plugin.InitTypo\)"):
        build_model(cfg)


def test_a_plugin_whose_init_reads_tensor_values_builds_validates_and_runs(isolated_registry, monkeypatch, tmp_path,
                                                                         capsys):
    """Validation builds the layers on the meta device, where float(tensor) raises: such a plug-in, fine on a real
    device, failed validate, build_model and the dry run. A layer whose __init__ needs values is built on the CPU and
    moved to meta for the checks; a real build is on the real device."""
    _init_plugin(tmp_path, monkeypatch)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_model({"variant": "zoo_init_reads_values"}, plugins=["zoo_init_plugin"])))
    assert cli_main(["validate", str(cfg)]) == 0, capsys.readouterr().out
    model = build_model(cfg)
    assert model.blocks[0].attention.temperature.device.type == "cpu"
    assert torch.allclose(model.blocks[0].attention.temperature, torch.full((4,), math.log(2.0)))
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 32)
    with torch.device("meta"):  # as validate and the dry run build it
        assert build_model(cfg).blocks[1].attention.temperature.device.type == "meta"


def test_a_plugin_component_whose_init_fails_is_named_at_its_model_key(tmp_path, capsys):
    """A plug-in MLP (norm, positional scheme) whose __init__ raised escaped validate and build_model as a raw
    traceback (validation builds only the attention layers); now a problem at model.mlp with its class and line."""
    from attention_zoo.components import MLPS
    from attention_zoo.components.mlps import SwiGLU

    @MLPS.register("zoo_init_typo_mlp")
    class InitTypoMLP(SwiGLU):
        def __init__(self, shape, **params):
            super().__init__(shape, **params)
            self.gain = torch.nn.Parameter(torch.ones(shape.width))  # StackShape has `dim`

    try:
        config = small_model({"variant": "vanilla"})
        config["model"]["mlp"] = "zoo_init_typo_mlp"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli_main(["validate", str(cfg)]) == 2
        out = capsys.readouterr().out
        assert (f"{cfg}: model.mlp = 'zoo_init_typo_mlp': test_plugins.test_a_plugin_component_whose_init_fails_is_"
                "named_at_its_model_key.<locals>.InitTypoMLP: its __init__ raised AttributeError: ") in out, out
        assert f"(at {__file__}:" in out, out
        with pytest.raises(ConfigError, match=r"model.mlp = 'zoo_init_typo_mlp': .*InitTypoMLP: its __init__ raised"):
            build_model(cfg)
    finally:
        del MLPS.registry._entries["zoo_init_typo_mlp"]


def test_a_plugin_component_refusing_its_configuration_is_quoted_as_a_layer_is(tmp_path, capsys):
    """A plug-in component that raises UserError is refusing its configuration, and its message already says what to
    change: quoted at model.<key> as a variant's is, not as "its __init__ raised UserError" (a crash of its own)."""
    from attention_zoo.components import NORMS
    from attention_zoo.components.norms import RMSNorm
    from attention_zoo.errors import UserError

    @NORMS.register("zoo_dim_by_3_norm")
    class DimBy3Norm(RMSNorm):
        def __init__(self, shape, **params):
            if shape.dim % 3:
                raise UserError(f"zoo_dim_by_3_norm needs model.dim divisible by 3, got {shape.dim}")
            super().__init__(shape, **params)

    try:
        config = small_model({"variant": "vanilla"})
        config["model"]["norm"] = "zoo_dim_by_3_norm"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli_main(["validate", str(cfg)]) == 2
        out = capsys.readouterr().out
        dim = config["model"]["dim"]
        assert (f"{cfg}: model.norm = 'zoo_dim_by_3_norm': zoo_dim_by_3_norm needs model.dim divisible by 3, "
                f"got {dim}") in out, out
        assert "its __init__ raised" not in out, out
    finally:
        del NORMS.registry._entries["zoo_dim_by_3_norm"]


def test_layers_reading_a_state_no_layer_writes_are_one_problem(tmp_path, capsys, isolated_registry):
    """A plug-in layer that reads a channel no layer below it writes cannot run: validate names the layers and the
    channel, once for all the layers it breaks (it was one long line per layer)."""
    from attention_zoo.state import SELECTION_PENALTY
    from attention_zoo.variant_registry import register_variant
    from attention_zoo.variants.vanilla import Vanilla

    @register_variant("zoo_penalty_reader")
    class PenaltyReader(Vanilla):
        def __init__(self, shape, **params):
            super().__init__(shape, **params)
            self.reads = (SELECTION_PENALTY.name,)

    config = small_model({"variant": "zoo_penalty_reader"})
    config["model"]["depth"] = 3
    config["model"]["layers"] = [{"at": 1, "attention": {"variant": "selective"}}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "1 problem in config" in out, out
    assert (f"{cfg}: model (layer 0, variant zoo_penalty_reader): reads state 'selection_penalty' that no earlier "
            "layer writes") in out, out  # layer 2 reads what the selective layer 1 writes: fine
    config["model"]["layers"] = []
    cfg.write_text(yaml.safe_dump(config))
    assert cli_main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "1 problem in config" in out and "model (layers 0, 1, 2, variant zoo_penalty_reader): read state" in out, out


def test_a_plugin_component_whose_init_reads_a_tensor_value_validates_as_a_layer_does(tmp_path, capsys):
    """Layers whose __init__ reads a tensor's value are built on the CPU where validation builds on meta; components
    were not, so such a plug-in MLP was refused by validate, ablate and train ('.item() cannot be called on meta
    tensors') though it builds on every real device."""
    from attention_zoo.components import MLPS
    from attention_zoo.components.mlps import SwiGLU

    @MLPS.register("zoo_value_reading_mlp")
    class ValueReadingMLP(SwiGLU):
        def __init__(self, shape, **params):
            super().__init__(shape, **params)
            self.scale = float(torch.tensor(2.0).sqrt())

    try:
        config = small_model({"variant": "vanilla"}, train={"steps": 1, "batch_size": 2, "seq_len": 8})
        config["model"].update(mlp="zoo_value_reading_mlp", vocab_size=256)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli_main(["validate", str(cfg)]) == 0, capsys.readouterr().out
        with torch.device("meta"):
            assert build_model(cfg).blocks[0].mlp.scale == pytest.approx(2 ** 0.5)
    finally:
        del MLPS.registry._entries["zoo_value_reading_mlp"]
