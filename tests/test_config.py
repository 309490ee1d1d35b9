"""YAML configs: every example validates and builds; every kind of mistake gives a message naming the
file, the key path, the bad value and what is valid; all problems are reported at once."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from attention_zoo import ConfigError, build_model, load_config

ROOT = Path(__file__).resolve().parents[1]


def model_configs() -> list[Path]:
    """configs/*.yaml, and any YAML in a subfolder that is a model config (has `model:` or `base:`).
    Ablation sweeps (configs/ablations/, `runs:`) and other specs have their own tests."""
    found = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "ablations" in path.relative_to(ROOT / "configs").parts:
            continue
        data = yaml.safe_load(path.read_text()) or {}
        top_level = path.parent == ROOT / "configs"
        if isinstance(data, dict) and "runs" not in data and (top_level or {"model", "base"} & set(data)):
            found.append(path)
    return found


def test_the_examples_exist():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    for name in ["vanilla", "gqa", "mqa", "residual", "selective", "selective_gqa", "selective_residual",
                 "cross_layer_share", "cross_layer_accumulate", "selective_hybrid"]:
        assert f"{name}.yaml" in names


@pytest.mark.parametrize("path", model_configs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_example_validates_and_builds(path):
    config = load_config(path)
    with torch.device("meta"):  # shapes only: no memory, any size
        model = build_model(config)
    tokens = torch.zeros(1, 8, dtype=torch.long, device="meta")
    assert model(tokens).shape == (1, 8, config["model"]["vocab_size"])


# ---------------------------------------------------------------------------------------------------
# Broken configs: (id, files written to a temporary folder (the first is loaded), expected fragments).
# "{main}" in a fragment stands for the loaded file's path.

SMALL = "model:\n  dim: 64\n  depth: 4\n  heads: 8\n"
BROKEN = [
    ("yaml-syntax", {"bad.yaml": "model:\n  dim: 64\n  heads: [8\n"}, ["{main}", "invalid YAML", "line"]),
    ("yaml-tab-indent", {"bad.yaml": "model:\n\tdim: 64\n"}, ["{main}", "invalid YAML"]),
    ("wrong-type", {"bad.yaml": "model:\n  dim: wide\n"}, ["{main}", "model.dim", "'wide'", "expected int"]),
    ("bool-for-int", {"bad.yaml": "model:\n  depth: true\n"}, ["{main}", "model.depth", "True", "expected int"]),
    ("bool-for-kv-heads", {"bad.yaml": SMALL + "  attention: {variant: selective, kv_heads: true}\n"},
     ["{main}", "model.attention.kv_heads", "True", "expected int or null"]),
    ("kv-heads-not-dividing", {"bad.yaml": SMALL + "  attention: {variant: selective, kv_heads: 3}\n"},
     ["{main}", "model.attention.kv_heads", "= 3", "divisible by kv_heads", "valid: 1, 2, 4, 8"]),
    ("gqa-kv-heads-not-fewer", {"bad.yaml": SMALL + "  attention: {variant: gqa, kv_heads: 8}\n"},
     ["{main}", "model.attention.kv_heads", "= 8", "1 <= kv_heads < heads", "vanilla"]),
    ("gqa-kv-heads-missing", {"bad.yaml": SMALL + "  attention: {variant: gqa}\n"},
     ["{main}", "model.attention.kv_heads", "required by variant 'gqa'"]),
    ("unknown-variant", {"bad.yaml": SMALL + "  attention: {variant: selectve}\n"},
     ["{main}", "model.attention.variant", "'selectve'", "did you mean 'selective'", "valid: ", "vanilla"]),
    ("unknown-variant-in-layer", {"bad.yaml": SMALL + "  layers: [{at: [1], attention: {variant: residul}}]\n"},
     ["{main}", "model.layers[0].attention.variant", "did you mean 'residual'"]),
    ("unknown-model-key", {"bad.yaml": "model:\n  dimm: 64\n"}, ["{main}", "model.dimm", "unknown key", "did you mean 'dim'"]),
    ("unknown-section", {"bad.yaml": "modle:\n  dim: 64\n"}, ["{main}", "modle", "unknown section", "did you mean 'model'"]),
    ("unknown-variant-parameter", {"bad.yaml": SMALL + "  attention: {variant: selective, selection_haed: 1}\n"},
     ["{main}", "model.attention.selection_haed", "unknown parameter", "did you mean 'selection_head'"]),
    ("parameter-of-another-variant", {"bad.yaml": SMALL + "  layers: [{at: 2, attention: {variant: vanilla, decay: 0.5}}]\n"},
     ["{main}", "model.layers[0].attention.decay", "unknown parameter for variant 'vanilla'", "valid: kv_heads"]),
    ("bad-choice", {"bad.yaml": SMALL + "  attention: {variant: cross_layer_selective, mode: shared}\n"},
     ["{main}", "model.attention.mode", "'shared'", "did you mean 'share'", "valid: share, accumulate"]),
    ("selection-head-out-of-range", {"bad.yaml": SMALL + "  attention: {variant: selective, selection_head: 8}\n"},
     ["{main}", "model.attention.selection_head", "= 8", "[0, 7]"]),
    ("sources-out-of-range", {"bad.yaml": SMALL + "  attention: {variant: cross_layer_selective, sources: [0, 4]}\n"},
     ["{main}", "model.attention.sources", "[4]", "[0, 3]"]),
    ("bad-layer-index", {"bad.yaml": SMALL + "  layers: [{at: [1, 7], attention: {variant: vanilla}}]\n"},
     ["{main}", "model.layers[0].at", "[7]", "outside [0, 3]"]),
    ("bad-layer-key", {"bad.yaml": SMALL + "  layers: [{at: [1], attn: {variant: vanilla}}]\n"},
     ["{main}", "model.layers[0].attn", "unknown key", "did you mean", "'attention'"]),
    ("dim-not-divisible-by-heads", {"bad.yaml": "model:\n  dim: 60\n  heads: 8\n"},
     ["{main}", "model.heads", "= 8", "dim (60) must be divisible by heads", "model.head_dim"]),
    ("bad-backend", {"bad.yaml": "backend: sdap\n"}, ["{main}", "backend", "'sdap'", "did you mean 'sdpa'", "valid: auto"]),
    ("negative-minimum", {"bad.yaml": "model:\n  depth: 0\n"}, ["{main}", "model.depth", "= 0", "must be >= 1"]),
    ("dropout-too-large", {"bad.yaml": "model:\n  dropout: 1.5\n"}, ["{main}", "model.dropout = 1.5", "must be < 1"]),
    ("share-without-source", {"bad.yaml": SMALL + "  attention: {variant: cross_layer_selective, sources: [2]}\n"},
     ["{main}", "model (layers 0, 1, variant cross_layer_selective): read state 'selection_penalty' that no "
      "earlier layer writes: mode share reuses", "sources: [0]), or use mode: accumulate"]),

    ("missing-base", {"bad.yaml": "base: nowhere.yaml\n"}, ["{main}", "base", "nowhere.yaml", "file not found"]),
    ("base-cycle", {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, ["a.yaml", "b.yaml", "inheritance cycle"]),
    ("model-not-a-mapping", {"bad.yaml": "model: 3\n"}, ["{main}", "model = 3", "expected a mapping with keys: vocab_size, dim"]),
    ("variant-not-a-name", {"bad.yaml": SMALL + "  layers: [{at: [1], attention: {variant: [selective]}}]\n"},
     ["{main}", "model.layers[0].attention.variant = ['selective']", "unknown variant", "valid: "]),
    ("empty-file", {"bad.yaml": ""}, ["{main}: (file): the file is empty", "expected a mapping of sections"]),
    ("comments-only", {"bad.yaml": "# model: {dim: 64}\n\n"}, ["{main}: (file): the file is empty"]),
    ("empty-base", {"bad.yaml": "base: empty.yaml\nmodel: {dim: 64}\n", "empty.yaml": ""},
     ["empty.yaml: (file): the file is empty"]),
    ("plugins-not-a-list", {"bad.yaml": "plugins: my_plugin\n"},
     ["{main}", "plugins", "'my_plugin'", "list of importable module names"]),
    ("duplicate-key", {"bad.yaml": "model: {dim: 64, dim: 32}\n"},
     ["{main}", "line 1, column 18", "duplicate key 'dim' (first at line 1)"]),
    ("duplicate-key-nested", {"bad.yaml": SMALL + "  attention: {variant: selective}\n  depth: 2\n"},
     ["{main}", "line 6, column 3", "duplicate key 'depth' (first at line 3)"]),
    ("duplicate-section", {"bad.yaml": "model: {dim: 64}\ntrain: {steps: 3}\nmodel: {depth: 2}\n"},
     ["{main}", "line 3", "duplicate key 'model'"]),
    ("null-for-a-bool-parameter", {"bad.yaml": SMALL + "  attention: {variant: selective, protect_bos: null}\n"},
     ["{main}", "model.attention.protect_bos = None: expected bool"]),
    ("shape-error-does-not-hide-a-misspelt-variant",
     {"bad.yaml": "model:\n  dim: 130\n  heads: 4\n  depth: 0\n  attention: {variant: selectve}\n"},
     ["{main}", "model.depth = 0", "model.heads = 4: dim (130) must be divisible by heads",
      "model.attention.variant = 'selectve': unknown variant; did you mean 'selective'"]),
    ("layer-override-without-attention", {"bad.yaml": SMALL + "  layers: [{at: [1]}]\n"},
     ["{main}", "model.layers[0].attention", "missing", "changes nothing"]),
    ("layer-override-at-no-layer", {"bad.yaml": SMALL + "  layers: [{at: [], attention: {variant: vanilla}}]\n"},
     ["{main}", "model.layers[0].at = []", "selects no layer"]),
    ("sources-repeated", {"bad.yaml": SMALL + "  attention: {variant: cross_layer_selective, sources: [0, 0]}\n"},
     ["{main}", "model.attention.sources", "[0] listed more than once"]),
    ("mlp-ratio-zero", {"bad.yaml": "model:\n  mlp_ratio: 0\n"}, ["{main}", "model.mlp_ratio = 0", "must be > 0"]),
]


@pytest.mark.parametrize("files,fragments", [(f, e) for _, f, e in BROKEN], ids=[i for i, _, _ in BROKEN])
def test_broken_config_message(tmp_path, files, fragments):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    main = tmp_path / next(iter(files))
    with pytest.raises(ConfigError) as info:
        load_config(main)
    message = str(info.value)
    for fragment in fragments:
        assert fragment.replace("{main}", str(main)) in message, f"{fragment!r} missing from:\n{message}"


def test_a_file_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe model: 1")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: (file): not UTF-8 text (byte 0" in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("backend: fast\nmodel:\n  dim: 64\n  heads: 8\n  dimm: 3\n  dropout: lots\n"
                    "  attention: {variant: selective, kv_heads: 3, protect_bos: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    paths = {p.path for p in info.value.problems}
    assert {"backend", "model.dimm", "model.dropout"} <= paths
    assert str(info.value).startswith(f"{len(info.value.problems)} problems in config")


def test_a_malformed_override_does_not_hide_problems_in_the_default_attention(tmp_path):
    path = tmp_path / "layers.yaml"
    path.write_text(SMALL + "  attention: {variant: selective, kv_heads: 3}\n"
                    "  layers: [{at: [9], attention: {variant: vanilla}}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert {p.path for p in info.value.problems} == {"model.layers[0].at", "model.attention.kv_heads"}


def test_every_parameter_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(SMALL + "  attention: {variant: selective, kv_heads: 3, protect_bos: 1, selection_head: 9}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert {p.path for p in info.value.problems} == {
        "model.attention.kv_heads", "model.attention.protect_bos", "model.attention.selection_head"}


def test_config_error_is_a_user_error():
    from attention_zoo.errors import UserError

    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------------------------------------------
# Overrides and inheritance.

def test_overrides(tmp_path):
    config = load_config(ROOT / "configs" / "selective.yaml",
                         ["model.depth=6", "model.attention.kv_heads=2", "backend=math", "model.dropout=0.1"])
    m = config["model"]
    assert (m["depth"], m["attention"]["kv_heads"], config["backend"], m["dropout"]) == (6, 2, "math", 0.1)
    assert m["attention"]["variant"] == "selective"  # untouched keys stay
    model = build_model(config)
    assert len(model.blocks) == 6 and model.blocks[0].attention.kv_heads == 2


def test_override_of_a_list_item():
    config = load_config(ROOT / "configs" / "selective_hybrid.yaml", ["model.layers.1.at=[2]"])
    variants = [type(b.attention).__name__ for b in build_model(config).blocks]
    assert variants == ["Selective", "Selective", "Vanilla", "Selective"]


@pytest.mark.parametrize("override,fragments", [
    ("model.depth", ["(override)", "KEY.PATH=VALUE"]),
    ("model.depth=six", ["model.depth", "'six'", "expected int"]),
    ("model.layers.5.at=[1]", ["model.layers.5", "no list item '5' (it has 2 items, 0 to 1); set the whole list"]),
    ("model.layers.x.at=[1]", ["no list item 'x' (it has 2 items, 0 to 1)"]),
    # an index into a list the config does not have (it made a mapping {'5': ...} and said "expected list")
    ("model.attention.terms.0.weight=2", ["model.attention.terms: no list to take item 0 of; set the whole list, "
                                          "e.g. model.attention.terms=[...]"]),
])
def test_bad_override(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "selective_hybrid.yaml", [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_base_inheritance(tmp_path, caplog):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(textwrap.dedent("""\
        backend: math
        model:
          dim: 64
          depth: 3
          heads: 4
          attention: {variant: selective, selection_head: 2}
          layers: [{at: [0], attention: {variant: vanilla}}]
        """))
    (tmp_path / "child.yaml").write_text(textwrap.dedent("""\
        base: shared/base.yaml        # relative to this file
        model:
          depth: 2
          attention: {kv_heads: 2}    # mappings merge key by key
          layers: []                  # lists are replaced
        """))
    config = load_config(tmp_path / "child.yaml")
    m = config["model"]
    assert config["backend"] == "math" and (m["dim"], m["depth"], m["heads"]) == (64, 2, 4)
    assert m["attention"] == {"variant": "selective", "selection_head": 2, "kv_heads": 2}
    assert m["layers"] == []
    assert config.source == str(tmp_path / "child.yaml")
    # an empty section replaces the base's whole section: its defaults apply; a null key is a type error
    (tmp_path / "reset.yaml").write_text("base: shared/base.yaml\nmodel:\n")
    with caplog.at_level(logging.WARNING, logger="attention_zoo.config"):
        config = load_config(tmp_path / "reset.yaml")
    assert config["model"] == load_config({})["model"] and config["backend"] == "math"
    # a commented-out key under `model:` makes it null: the variant under test silently became vanilla
    assert "reset.yaml: `model:` is empty (null), so it replaces the whole `model` section of its base" in caplog.text
    (tmp_path / "null_key.yaml").write_text("base: shared/base.yaml\nmodel: {dim: null}\n")
    with pytest.raises(ConfigError, match=r"null_key.yaml: model.dim = None: expected int"):
        load_config(tmp_path / "null_key.yaml")


def test_a_problem_names_the_file_or_override_that_set_the_value(tmp_path, monkeypatch):
    """A value from a base file is blamed on that file (through every level of `base:`), not on the file
    loaded; a value an override set is blamed on the override; the loaded file keeps its own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "grand.yaml").write_text(
        "model: {dim: 64, heads: 8, attention: {variant: selective, kv_heads: 3}, layers: [{at: 0, attention: {}}]}\n")
    (tmp_path / "shared" / "base.yaml").write_text("base: grand.yaml\nmodel: {dimm: 1, dropout: 0.1}\nbackend: mathh\n")
    (tmp_path / "child.yaml").write_text("base: shared/base.yaml\nmodel: {dropout: 1.5}\n")
    with pytest.raises(ConfigError) as info:
        load_config("child.yaml", ["model.depth=0", "model.layers.0.at=7"])
    sources = {p.path: p.source for p in info.value.problems}
    base, grand = "shared/base.yaml (base of child.yaml)", "shared/grand.yaml (base of shared/base.yaml, base of child.yaml)"
    assert sources == {"backend": base, "model.dimm": base, "model.depth": "override (on child.yaml)",
                       "model.dropout": "child.yaml"}
    with pytest.raises(ConfigError) as info:  # shapes fine: the variant's and the layers' own checks run
        load_config("child.yaml", ["model.dimm=null", "model.layers.0.at=7"])
    sources = {p.path: p.source for p in info.value.problems}
    assert sources == {"model.dimm": "override (on child.yaml)", "backend": base, "model.dropout": "child.yaml",
                       "model.attention.kv_heads": grand, "model.layers[0].at": "override (on child.yaml)"}
    assert f"  {grand}: model.attention.kv_heads = 3: heads (8) must be divisible by kv_heads" in str(info.value)


def test_base_from_a_dict(tmp_path):
    config = load_config({"base": str(ROOT / "configs" / "gqa.yaml"), "model": {"depth": 2}})
    assert config["model"]["attention"] == {"variant": "gqa", "kv_heads": 2} and config["model"]["depth"] == 2


def test_layer_override_inherits_only_declared_parameters():
    """An override naming another variant keeps only the defaults that variant declares."""
    from attention_zoo.config import layer_specs

    config = load_config({"model": {"dim": 64, "heads": 8, "depth": 3,
                                    "attention": {"variant": "selective", "kv_heads": 2, "selection_head": 3},
                                    "layers": [{"at": 1, "attention": {"variant": "vanilla"}},
                                               {"at": 2, "attention": {"variant": "cross_layer_selective"}}]}})
    specs = layer_specs(config["model"])
    assert specs[1].variant == "vanilla" and specs[1].params == {"kv_heads": 2}
    assert specs[2].params == {"kv_heads": 2, "selection_head": 3}


def test_layer_override_may_name_a_variant_when_the_default_names_none():
    config = load_config({"model": {"dim": 32, "heads": 4, "depth": 2, "attention": {"kv_heads": 2},
                                    "layers": [{"at": [1], "attention": {"variant": "selective"}}]}})
    kinds = [type(b.attention).__name__ for b in build_model(config).blocks]
    assert kinds == ["Vanilla", "Selective"] and build_model(config).blocks[1].attention.kv_heads == 2


def test_cli_validate_exits_2_without_traceback(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL + "  attention: {variant: selectve, kv_heads: 3}\n")
    result = run_cli("validate", str(ROOT / "configs" / "vanilla.yaml"), str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "vanilla.yaml: ok" in result.stdout
    assert f"{bad}: model.attention.variant = 'selectve'" in result.stdout + result.stderr


def test_validate_reports_a_seq_len_over_max_seq_len_with_the_model_problems(tmp_path, capsys):
    """plan_run, which compares train.seq_len with model.max_seq_len, runs only for a config whose every key is valid:
    a wrong model.heads hid the seq_len problem until it was fixed. The comparison needs only those two values."""
    from attention_zoo.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {dim: 30, heads: 4, max_seq_len: 128}\ntrain: {seq_len: 256}\n")
    assert main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "2 problems in config" in out, out
    assert f"{cfg}: model.heads = 4: dim (30) must be divisible by heads" in out, out
    assert f"{cfg}: train.seq_len = 256: longer than model.max_seq_len (128); raise model.max_seq_len" in out, out
    cfg.write_text("model: {dim: 32, heads: 4, max_seq_len: 128}\ntrain: {seq_len: 256}\n")  # the model fixed: once
    assert main(["validate", str(cfg)]) == 2
    out = capsys.readouterr().out
    assert "1 problem in config" in out and out.count("train.seq_len = 256") == 1, out
    for bad in ("model: {dim: 30, heads: 4, max_seq_len: 0}\ntrain: {seq_len: 256}\n",  # no valid value to compare
                "model: {dim: 30, heads: 4, max_seq_len: 128}\ntrain: {seq_len: 256, lr: x}\ndata: {name: nope}\n",
                "model: {dim: 30, heads: 4, max_seq_len: 128}\ntrain: {seq_len: 100}\n"):
        cfg.write_text(bad)
        assert main(["validate", str(cfg)]) == 2
        out = capsys.readouterr().out
        assert ("longer than model.max_seq_len" in out) == ("lr: x" in bad), out


def test_files_are_named_as_the_user_wrote_them(tmp_path, monkeypatch):
    """A missing base, a base cycle and an empty base were named by their resolved absolute paths (and a missing
    base by the path it resolved to rather than the `base:` value written in the file); problems now name each
    file as the user wrote it, relative to the working directory, and where a base was looked for."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    files = {"b2.yaml": "base: nothere.yaml\n", "sub/c.yaml": "base: ../gone.yaml\n", "a.yaml": "base: b.yaml\n",
             "b.yaml": "base: a.yaml\n", "e.yaml": "base: sub/empty.yaml\n", "sub/empty.yaml": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expected = {"b2.yaml": "b2.yaml: base = 'nothere.yaml': file not found",
                "sub/c.yaml": "sub/c.yaml: base = '../gone.yaml': file not found (looked for gone.yaml, beside sub/c.yaml)",
                "a.yaml": "b.yaml: base = 'a.yaml': inheritance cycle: a.yaml -> b.yaml -> a.yaml",
                "e.yaml": "sub/empty.yaml: (file): the file is empty",
                "missing.yaml": "missing.yaml: (file) = 'missing.yaml': file not found"}
    for name, message in expected.items():
        with pytest.raises(ConfigError) as info:
            load_config(name)
        assert message in str(info.value) and str(tmp_path) not in str(info.value), str(info.value)


def test_share_mode_may_reuse_the_f_of_a_selective_layer_below_its_first_source():
    """Layer 0 selective writes F; cross-layer share layers above reuse it until their own source (layer 2)
    refreshes it. Valid: a check written for `sources: []` once refused it for listing no source at or below."""
    config = {"model": {"dim": 32, "depth": 3, "heads": 2, "max_seq_len": 16,
                        "attention": {"variant": "cross_layer_selective", "mode": "share", "sources": [2]},
                        "layers": [{"at": 0, "attention": {"variant": "selective"}}]}}
    model = build_model(config)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)
