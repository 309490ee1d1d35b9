"""Sweeps: expansion into runs, validation of every run up front, skipping finished runs, summaries and plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from attention_zoo.ablate import read_sweep_file
from attention_zoo.ablate.records import RESULTS, current_records, read_records
from attention_zoo.ablate.runner import run_sweep, write_summaries
from attention_zoo.ablate.summary import markdown_table
from attention_zoo.cli import main
from attention_zoo.config import ConfigError

BASE = {
    "model": {"dim": 16, "depth": 2, "heads": 2, "max_seq_len": 16},
    "data": {"name": "shakespeare"},
    "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "warmup": 1, "eval_every": 1, "eval_batches": 1,
              "checkpoint_every": 0, "log_every": 1, "device": "cpu"},
}


def sweep_file(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, **spec}, sort_keys=False))
    return path


@pytest.fixture
def one_thread_children(monkeypatch):
    """Each run is a child `attention-zoo train` process: keep their tiny models on one thread."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # passed to each run process, see runner._child


def test_grid_named_runs_and_seeds_expand_to_every_combination(tmp_path):
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selective"], "model.attention.kv_heads": [None, 1]},
                      runs={"residual": {"model.attention.variant": "residual"}}, seeds=[0, 3])
    sweep = read_sweep_file(path)
    assert sweep.labels == ["variant=vanilla kv_heads=null", "variant=vanilla kv_heads=1", "variant=selective kv_heads=null",
                            "variant=selective kv_heads=1", "residual"]
    assert len(sweep.runs) == 10 and {r.seed for r in sweep.runs} == {0, 3}
    assert [r.seed for r in sweep.runs] == [0] * 5 + [3] * 5  # seed-major: a half-finished sweep covers every label
    run = sweep.runs[-1]
    assert run.config["model"]["attention"] == {"variant": "residual"} and run.config["train"]["seed"] == 3
    assert sweep.runs[1].config["model"]["attention"] == {"variant": "vanilla", "kv_heads": 1}
    assert len({r.fingerprint for r in sweep.runs}) == 10  # every run's exact config differs


def test_a_sweep_needs_a_base_and_without_grid_or_runs_is_its_base_once_per_seed(tmp_path, capsys):
    path = tmp_path / "no_base.yaml"
    path.write_text("name: x\nruns: {}\n")  # no base: every run would be the library's defaults
    assert main(["ablate", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: base: required (the config every run starts from: a config file" in err
    assert "1 problem in config" in err and "Traceback" not in err
    path.write_text("name: x\nbase: {}\nruns: {a: {}}\n")  # an empty inline base is the same defaults
    assert main(["ablate", str(path), "--dry-run"]) == 2
    assert f"{path}: base = {{}}: empty; give the config every run starts from" in capsys.readouterr().err
    sweep = read_sweep_file(sweep_file(tmp_path, runs={}, seeds=[0, 1]))
    assert [(r.label, r.seed, r.settings) for r in sweep.runs] == [("base", 0, {}), ("base", 1, {})]


def test_every_problem_of_every_run_is_reported_before_training(tmp_path):
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selectve"], "model.attention.kv_heads": [None, 3]},
                      runs={"long": {"train.seq_len": 64}, "bad metric": {}}, seeds=[0], metric="val.accuracy", extra=1)
    with pytest.raises(ConfigError) as err:
        read_sweep_file(path)
    assert [p.path for p in err.value.problems] == ["extra"]  # the sweep's own keys come first
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selectve"], "model.attention.kv_heads": [None, 3]},
                      runs={"long": {"train.seq_len": 64}}, seeds=[0], metric="val.accuracy")
    with pytest.raises(ConfigError) as err:
        read_sweep_file(path)
    text = str(err.value)
    assert "model.attention.variant = 'selectve'" in text and "did you mean 'selective'" in text
    assert "runs: variant=selectve kv_heads=null, variant=selectve kv_heads=3" in text
    assert "model.attention.kv_heads = 3" in text  # 2 heads are not divisible into 3 groups
    assert "(runs: long)" in text and "train.seq_len = 64" in text and "max_seq_len (16)" in text
    assert "metric = 'val.accuracy'" in text and "valid here: val.bpb, val.loss" in text


def test_sweep_runs_skips_finished_runs_and_summarises(tmp_path, one_thread_children, capsys):
    path = sweep_file(tmp_path, runs={"vanilla": {"model.attention.variant": "vanilla"},
                                      "selective": {"model.attention.variant": "selective"}}, seeds=[0, 1], metric="val.bpb")
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = read_records(out)
    assert [(r["label"], r["seed"]) for r in records] == [("vanilla", 0), ("selective", 0), ("vanilla", 1), ("selective", 1)]
    assert all(len(r["curve"]) == 2 and r["params"] > 0 and r["peak_mem_mb"] > 0 for r in records)
    assert "| vanilla |" in printed and "| selective |" in printed  # the table is printed
    for name in ("results.csv", "results.md", "curves.png", "final.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.csv").read_text().splitlines()) == 5

    # A second invocation trains nothing, and a torn last line (a sweep killed mid-write) is ignored.
    with (out / RESULTS).open("a") as f:
        f.write('{"label": "vanilla", "se')
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert len(read_records(out)) == 4

    # Changing the config through --set is a different run: it must not reuse the old folder silently.
    assert main(["ablate", str(path), "--out", str(out), "--set", "train.steps=3"]) == 2
    assert "holds a run of a different config" in capsys.readouterr().err


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, one_thread_children, capsys):
    # The sweep validates, but one run's data is removed before it trains: that run fails, the other finishes.
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be " * 200)
    path = sweep_file(tmp_path, runs={"a": {"model.attention.variant": "vanilla"}, "b": {"model.attention.variant": "gqa",
                                                                                         "model.attention.kv_heads": 1}})
    spec = yaml.safe_load(path.read_text())
    spec["base"]["data"] = {"text": str(text)}
    path.write_text(yaml.safe_dump(spec))
    sweep = read_sweep_file(path)
    sweep.runs[0].config["data"] = {"name": "text", "text": str(tmp_path / "gone.txt")}
    failed = run_sweep(sweep, tmp_path / "out", progress=False)
    printed = capsys.readouterr().out
    assert failed == 1 and "a (seed 0): FAILED" in printed and "gone.txt" in printed
    assert [r["label"] for r in read_records(tmp_path / "out")] == ["b"]


def fake_record(label: str, seed: int, loss: float, fingerprint: str) -> dict:
    return {"label": label, "seed": seed, "fingerprint": fingerprint, "settings": {}, "run_dir": "x", "params": 1000,
            "steps": 10, "train_loss": loss + 0.1, "val": {"loss": loss, "bpb": loss / 0.6931}, "tokens_per_s": 100.0,
            "peak_mem_mb": 10.0, "train_time_s": 1.0, "wall_s": 1.0, "device": "cpu",
            "curve": [{"step": 5, "loss": loss + 1}, {"step": 10, "loss": loss}]}


def test_table_is_mean_and_sample_std_over_seeds_with_the_best_in_bold(tmp_path):
    path = sweep_file(tmp_path, runs={"a": {}, "b": {"train.lr": 0.002}}, seeds=[0, 1])
    sweep = read_sweep_file(path)
    fp = {(r.label, r.seed): r.fingerprint for r in sweep.runs}
    records = [fake_record("a", 0, 1.0, fp["a", 0]), fake_record("a", 1, 3.0, fp["a", 1]),
               fake_record("b", 0, 1.5, fp["b", 0]), fake_record("b", 1, 1.5, fp["b", 1]),
               fake_record("b", 1, 9.0, "an-older-config")]  # not this sweep's: ignored
    mine = current_records(records, sweep.runs)
    assert len(mine) == 4
    table = markdown_table(sweep, mine)
    assert "| a | 1,000 | 2.0000 ± 1.4142 |" in table  # mean of 1 and 3, sample std sqrt(2)
    assert "| b | 1,000 | **1.5000 ± 0.0000** |" in table
    write_summaries(tmp_path, sweep, mine)
    assert (tmp_path / "final.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(mine))  # records stay plain JSON


def test_paired_differences_to_the_baseline_are_per_seed(tmp_path):
    """Δ pairs each seed with the baseline's same seed: b - a is (-1, +0.5, -0.2) on seeds (0, 1, 2), mean -0.2333,
    sample std 0.7506, better on 2 of 3; a seed the baseline lacks (3) is left out of the pairing."""
    path = sweep_file(tmp_path, runs={"a": {}, "b": {"train.lr": 0.002}}, seeds=[0, 1, 2, 3], baseline="a")
    sweep = read_sweep_file(path)
    fp = {(r.label, r.seed): r.fingerprint for r in sweep.runs}
    losses = {"a": (2.0, 1.0, 3.0), "b": (1.0, 1.5, 2.8, 0.1)}
    records = [fake_record(label, seed, loss, fp[label, seed]) for label, values in losses.items()
               for seed, loss in enumerate(values)]
    table = markdown_table(sweep, current_records(records, sweep.runs))
    assert "Δ vs a, paired" in table and "| a | 1,000 | 2.0000 ± 1.0000 | (baseline) |" in table
    assert "| -0.2333 ± 0.7506 (better in 2/3) |" in table


def test_a_baseline_that_is_not_a_run_is_refused_naming_the_labels(tmp_path):
    path = sweep_file(tmp_path, runs={"a": {}, "b": {"train.lr": 0.002}}, baseline="vanila")
    with pytest.raises(ConfigError) as err:
        read_sweep_file(path)
    (problem,) = err.value.problems
    assert problem.path == "baseline" and problem.value == "vanila" and "'a', 'b'" in problem.message


def test_seeds_option_runs_only_the_named_seeds(tmp_path, capsys):
    path = sweep_file(tmp_path, runs={"a": {}, "b": {"train.lr": 0.002}}, seeds=[0, 1, 2])
    assert main(["ablate", str(path), "--seeds", "2,0", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert [line.split("(seed ")[1][0] for line in listed] == ["0", "0", "2", "2"]  # the sweep's order
    assert main(["ablate", str(path), "--seeds", "5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and "0, 1, 2" in err and "Traceback" not in err


@pytest.mark.parametrize("setting,message", [
    ("train.steps=[1", "--set: train.steps = '[1': value is not valid YAML: expected ',' or ']'"),
    ("=3", "--set: (override) = '=3': the key is missing"),
])
def test_a_bad_set_is_one_clean_message_as_for_a_train_override(tmp_path, capsys, setting, message):
    path = sweep_file(tmp_path, runs={"a": {}})
    assert main(["ablate", str(path), "--dry-run", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and "1 problem in config" in err and "Traceback" not in err
    assert "unknown section" not in err


def test_summarize_without_results_is_refused_and_creates_nothing(tmp_path, capsys):
    path = sweep_file(tmp_path, runs={"a": {}})
    out = tmp_path / "never-ran"
    assert main(["ablate", str(path), "--out", str(out), "--summarize"]) == 2
    err = capsys.readouterr().err
    assert f"--summarize: {out} holds no finished run" in err and "Traceback" not in err
    assert not out.exists()


def test_every_runs_init_from_is_checked_before_anything_trains(tmp_path, capsys):
    """train.init_from must be a checkpoint folder whose model section is the run's (as train checks it, without
    reading weights); every such problem is listed by the dry run and refuses the real sweep before any run."""
    from attention_zoo.checkpoint import save_checkpoint
    from attention_zoo.config import build_model

    good = save_checkpoint(tmp_path / "good", build_model(BASE))
    other = save_checkpoint(tmp_path / "other", build_model({**BASE, "model": {**BASE["model"], "dim": 32}}))
    path = sweep_file(tmp_path, runs={"fresh": {}, "good": {"train.init_from": str(good)},
                                      "missing": {"train.init_from": str(tmp_path / "nope")},
                                      "run folder": {"train.init_from": str(tmp_path)},
                                      "other": {"train.init_from": str(other)}})
    for argv in (["--dry-run"], ["--out", str(tmp_path / "out")]):
        assert main(["ablate", str(path), *argv]) == 2
        err = capsys.readouterr().err
        assert "3 problems in config" in err and "Traceback" not in err
        assert f"(runs: missing): train.init_from = '{tmp_path / 'nope'}': not a checkpoint folder" in err
        assert f"(runs: run folder): train.init_from = '{tmp_path}': not a checkpoint folder" in err
        assert "(runs: other): train.init_from" in err and "model.dim: checkpoint 32, config 16" in err
    assert not (tmp_path / "out").exists()


def test_runs_whose_labels_make_one_folder_name_are_refused_before_anything_trains(tmp_path, capsys):
    """Labels are made folder names by replacing what is unusual with `_`: `lr 1` and `lr/1` both trained in
    `lr_1/seed0`, and the second was refused mid-sweep ("holds a run of a different config", exit 2, no
    summary) after the first had trained; a run named `..` trained outside --out."""
    path = sweep_file(tmp_path, runs={"lr 1": {"train.lr": 1e-3}, "lr/1": {"train.lr": 3e-3},
                                      "..": {"train.lr": 2e-3}, "ok": {"train.lr": 4e-3}})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "2 problems in config" in err and "Traceback" not in err
    assert f"{path}: runs = ['lr 1', 'lr/1']: these runs' labels make one folder name, 'lr_1'; rename one" in err
    assert f"{path}: runs = '..': the label makes the folder name '..', which is no folder of its own" in err
    assert "'ok'" not in err


def test_a_text_path_the_sweep_file_sets_is_found_beside_it_as_in_a_config(tmp_path, monkeypatch):
    """data.md: a relative `data.text` is tried from the working directory, then beside the YAML file that sets it.
    A sweep file's inline base, grid or runs setting it were read from the working directory only: the sweep
    worked from its own folder and was refused from any other ("no such file or folder ... beside the YAML file
    that sets it", which was the very file)."""
    sub = tmp_path / "sweeps"
    sub.mkdir()
    for name in ("a.txt", "b.txt"):
        (sub / name).write_text(f"{name} holds some text to train on. " * 40)
    base = {**BASE, "data": {"text": "a.txt"}}
    path = sub / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "grid": {"model.depth": [1, 2]},
                                    "runs": {"b": {"data.text": "b.txt"}, "b again": {"data": {"text": "b.txt"}}}}))
    monkeypatch.chdir(tmp_path)
    sweep = read_sweep_file(path)
    texts = {run.label: run.config["data"]["text"] for run in sweep.runs}
    assert texts == {"depth=1": str(sub / "a.txt"), "depth=2": str(sub / "a.txt"), "b": str(sub / "b.txt"),
                     "b again": str(sub / "b.txt")}
    # --set is typed on the command line: its relative path is the working directory's, as train's overrides
    (tmp_path / "c.txt").write_text("c.txt holds some text to train on. " * 40)
    sweep = read_sweep_file(path, ["data.text=c.txt"])
    assert {run.config["data"]["text"] for run in sweep.runs if run.label.startswith("depth")} == {str(tmp_path / "c.txt")}


def test_tune_compares_each_setting_at_its_own_best_value(tmp_path):
    """tune: [train.lr] picks, per variant, the learning rate of the best mean over seeds and pairs the seeds of
    each variant's best against the baseline variant's best (not against the baseline's run at the same rate)."""
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selective"], "train.lr": [0.001, 0.002, 0.004]},
                      seeds=[0, 1], baseline="variant=vanilla lr=0.002", tune=["train.lr"])
    sweep = read_sweep_file(path)
    assert sweep.setting_of["variant=selective lr=0.004"] == "variant=selective"
    loss = {("vanilla", 0.001): (3.0, 3.2), ("vanilla", 0.002): (2.5, 2.9), ("vanilla", 0.004): (2.6, 2.6),
            ("selective", 0.001): (2.4, 2.4), ("selective", 0.002): (2.45, 2.45), ("selective", 0.004): (2.8, 2.9)}
    fp = {(r.label, r.seed): r.fingerprint for r in sweep.runs}
    records = []
    for (variant, lr), per_seed in loss.items():
        label = f"variant={variant} lr={lr}"
        for seed, value in enumerate(per_seed):
            record = fake_record(label, seed, value, fp[label, seed])
            record["val"]["bpb"] = value  # the sweep's metric is val.loss; bpb set equal for readability
            records.append(record)
    table = markdown_table(sweep, current_records(records, sweep.runs))
    assert "### Each setting at its best train.lr" in table
    # vanilla: means 3.1, 2.7, 2.6 -> lr 0.004, the grid's last value; selective: 2.4, 2.45, 2.85 -> 0.001, its first
    vanilla_row = next(line for line in table.splitlines() if line.startswith("| variant=vanilla | lr=0.004"))
    selective_row = next(line for line in table.splitlines() if line.startswith("| variant=selective | lr=0.001"))
    assert "(grid's edge)" in vanilla_row and "| 2.6000 ± 0.0000 | (baseline) |" in vanilla_row
    assert "0.001: 3.1000, 0.002: 2.7000, 0.004: 2.6000" in vanilla_row
    # paired per seed against vanilla at 0.004: (2.4 - 2.6, 2.4 - 2.6) = -0.2 on both seeds
    assert "| -0.2000 ± 0.0000 (better in 2/2) |" in selective_row


def test_a_tune_key_must_be_a_grid_key(tmp_path):
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selective"]}, tune=["train.lr"])
    with pytest.raises(ConfigError) as err:
        read_sweep_file(path)
    (problem,) = err.value.problems
    assert problem.path == "tune" and problem.value == "train.lr"
    assert "not a grid key; valid: model.attention.variant" in problem.message


def tuned_records(sweep, loss) -> list[dict]:
    """A fake record of every run of `sweep` whose loss(run) is not None."""
    return current_records([fake_record(r.label, r.seed, value, r.fingerprint) for r in sweep.runs
                            if (value := loss(r)) is not None], sweep.runs)


def row_of(table: str, setting: str) -> str:
    return next(line for line in table[table.index("### Each setting"):].splitlines()
                if line.startswith(f"| {setting} |"))


def test_tune_refuses_a_repeated_key_and_a_named_run_labelled_as_a_setting(tmp_path):
    """A named run labelled `variant=vanilla` beside a grid of variant x lr tuned over lr was taken for one more
    learning rate of vanilla (and could be chosen as its best); a key listed twice was accepted."""
    grid = {"model.attention.variant": ["vanilla", "selective"], "train.lr": [0.001, 0.002]}
    with pytest.raises(ConfigError) as err:
        read_sweep_file(sweep_file(tmp_path, grid=grid, runs={"variant=vanilla": {"train.lr": 0.01}},
                                   tune=["train.lr", "train.lr"]))
    assert [(p.path, p.value) for p in err.value.problems] == [("tune", "train.lr"), ("runs", "variant=vanilla")]
    assert "listed more than once" in str(err.value) and "rename the named run" in str(err.value)
    with pytest.raises(ConfigError, match="runs = 'base': also the label of a setting"):  # every grid key tuned
        read_sweep_file(sweep_file(tmp_path, grid={"train.lr": [0.001, 0.002]}, runs={"base": {}}, tune=["train.lr"]))


def test_tune_edges_are_the_grids_own_and_a_named_run_setting_the_key_is_not_tuned(tmp_path):
    """The grid's ends were read from every run's settings, named runs included: a named run at lr 0.01 made 0.01
    the 'last grid value', so vanilla's best at the grid's real end, 0.004, was not flagged, and the named run
    showed as tuned at 'lr=0.01 (grid's edge)'. A one-value grid is its own edge; unhashable values crashed."""
    grid = {"model.attention.variant": ["vanilla", "selective"], "train.lr": [0.001, 0.002, 0.004]}
    sweep = read_sweep_file(sweep_file(tmp_path, grid=grid, tune=["train.lr"],
                                       runs={"fast": {"model.attention.variant": "selective", "train.lr": 0.01}}))
    table = markdown_table(sweep, tuned_records(sweep, lambda r: 3.0 - 100 * r.settings["train.lr"]))
    assert "| lr=0.004 (grid's edge) |" in row_of(table, "variant=vanilla")
    assert row_of(table, "fast").startswith("| fast | not tuned (a named run) |")
    sweep = read_sweep_file(sweep_file(tmp_path, grid={**grid, "train.lr": [0.002]}, tune=["train.lr"]))
    assert "| lr=0.002 (grid's edge) |" in row_of(markdown_table(sweep, tuned_records(sweep, lambda r: 2.0)),
                                                  "variant=vanilla")
    grid = {"model.attention": [{"variant": "vanilla"}, {"variant": "selective"}, {"variant": "residual"}],
            "model.attention.kv_heads": [None, 1]}  # dict values; None shown as the labels show it
    sweep = read_sweep_file(sweep_file(tmp_path, grid=grid, tune=["model.attention"]))
    loss = {"vanilla": 2.0, "selective": 1.0, "residual": 3.0}
    table = markdown_table(sweep, tuned_records(sweep, lambda r: loss[r.settings["model.attention"]["variant"]]))
    row = row_of(table, "kv_heads=null")
    assert "| attention={'variant': 'selective'} |" in row  # the middle value: no edge
    assert "kv_heads=None" not in table


def test_tune_compares_a_settings_values_on_the_seeds_all_of_them_finished(tmp_path):
    """A half-finished sweep has some values on more seeds than others: their means over different seeds differ by
    the seeds' luck. Here seed 1 is harder for every value; lr 0.002 is better than 0.004 on seed 0, the one both
    finished, but its mean over seeds 0 and 1 was worse than 0.004's over seed 0 alone, and 0.004 was chosen."""
    grid = {"model.attention.variant": ["vanilla"], "train.lr": [0.001, 0.002, 0.004]}
    sweep = read_sweep_file(sweep_file(tmp_path, grid=grid, tune=["train.lr"], seeds=[0, 1]))
    on_seed0 = {0.001: 3.0, 0.002: 2.5, 0.004: 2.6}

    def loss(run):
        if run.seed == 1 and run.settings["train.lr"] == 0.004:
            return None  # not finished yet
        return on_seed0[run.settings["train.lr"]] + run.seed * 0.5
    row = row_of(markdown_table(sweep, tuned_records(sweep, loss)), "variant=vanilla")
    assert "| lr=0.002 |" in row and "0.002: 2.5000, 0.004: 2.6000 (over seed 0: those every value finished)" in row


def test_a_pipe_in_a_label_or_value_does_not_shift_the_tables_columns(tmp_path):
    """Markdown ends a cell at `|`: a run named `a|b` (allowed: its folder is a_b) or a string grid value with one
    added a column to its row, under the wrong headers."""
    sweep = read_sweep_file(sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selective"],
                                                       "train.lr": [0.001, 0.002]},
                                       runs={"a|b": {}}, baseline="a|b", tune=["train.lr"]))
    table = markdown_table(sweep, tuned_records(sweep, lambda r: 2.0 + r.settings.get("train.lr", 0)))
    main, tuned = table.split("### Each setting")
    for part in (main, tuned):
        counts = {line.replace("\\|", "").count("|") for line in part.splitlines() if line.startswith("|")}
        assert len(counts) == 1, part
    assert "| a\\|b |" in main and "Δ vs a\\|b, paired" in main


def test_a_folder_of_another_config_is_refused_before_anything_trains(tmp_path):
    """A changed sweep (or --set) whose later run finds its folder holding another config was refused only when it
    reached that run, after training every run before it."""
    from attention_zoo.errors import UserError

    sweep = read_sweep_file(sweep_file(tmp_path, grid={"train.lr": [0.001, 0.002, 0.003]}))
    out = tmp_path / "out"
    for label in ("lr=0.002", "lr=0.003"):
        (out / label / "seed0").mkdir(parents=True)
        (out / label / "seed0" / "run.yaml").write_text("model: {dim: 32}\n")
    with pytest.raises(UserError, match="each of 2 run folders .*lr=0.002/seed0.*lr=0.003/seed0.* holds a run of a "
                                        "different config"):
        run_sweep(sweep, out, progress=False)
    assert not (out / "lr=0.001").exists()  # the first run, whose folder was free, did not train


def test_a_key_path_that_is_not_text_is_a_problem_not_a_traceback(tmp_path, capsys):
    """YAML reads `1:` or `null:` as a number or None: a grid or run key of that kind raised AttributeError
    ('int' object has no attribute 'split'), exit 1 with a traceback."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE}) + "grid: {1: [2], null: [3]}\nruns: {a: {2: 4}}\n")
    assert main(["ablate", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "3 problems in config" in err
    assert f"{path}: grid = 1: expected a key path" in err and f"{path}: grid = None: expected a key path" in err
    assert f"{path}: runs.a = 2: expected a key path" in err


def test_curves_of_more_than_ten_labels_are_told_apart():
    """matplotlib's default cycle has ten colours: the 11th curve of a variant x learning-rate grid was drawn like
    the 1st. Up to 40 labels get distinct (colour, line style) pairs; past that, a clear error."""
    from attention_zoo.ablate.plots import line_styles

    for n in (1, 10, 11, 12, 40):
        styles = line_styles(n)
        assert len(styles) == n and len(set(styles)) == n
    with pytest.raises(ValueError, match="41 curves"):
        line_styles(41)


def test_every_distinct_model_is_dry_run_before_anything_trains(isolated_registry, tmp_path, capsys, monkeypatch):
    """A plug-in variant whose forward or backward raises, or settings that fail only once the model is built
    (differential under rope with a head dim not a multiple of 4), passed the sweep's checks: each was found when
    the sweep reached its run, in that run's train.log, after the runs before it had trained. Each distinct model
    (not each seed or learning rate) runs once on the meta device, forward and backward, as `validate` runs it,
    and every problem is reported at once, naming its runs and key path; exit 2, nothing written."""
    import torch

    from attention_zoo import ProjectedAttention, register_variant
    from attention_zoo.ablate import dry_runs
    from attention_zoo.ablate import sweep as sweep_module

    class Refuses(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no backward yet")

    @register_variant("zoo_forward_fails")
    class ForwardFails(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attention_bias(self, q, k, state, cache):
            raise RuntimeError("no forward yet")

    @register_variant("zoo_backward_fails")
    class BackwardFails(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attend(self, q, k, v, bias):
            return super().attend(Refuses.apply(q), k, v, bias)

    calls = []
    monkeypatch.setattr(sweep_module, "dry_run_problems",
                        lambda config: calls.append(config) or dry_runs.dry_run_problems(config))
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "zoo_forward_fails", "zoo_backward_fails"],
                                      "train.lr": [0.001, 0.002]},
                      runs={"differential": {"model.attention.variant": "differential", "model.heads": 4,
                                             "model.dim": 24}}, seeds=[0, 1])
    assert main(["ablate", str(path), "--dry-run"]) == 2
    assert len(calls) == 4  # vanilla, the two plug-ins, differential: 14 runs
    err = capsys.readouterr().err
    assert "3 problems in config" in err and "Traceback" not in err
    forward = (f"{path} (runs: variant=zoo_forward_fails lr=0.001, variant=zoo_forward_fails lr=0.002): "
               "model.attention.variant = 'zoo_forward_fails': layer 0 (")
    assert forward in err and "the model's forward on the meta device (1 x 16 tokens) raised RuntimeError: " \
                              "no forward yet" in err, err
    backward = (f"{path} (runs: variant=zoo_backward_fails lr=0.001, variant=zoo_backward_fails lr=0.002): "
                "model.attention.variant = 'zoo_backward_fails': layer 1 (")
    assert backward in err and "the backward of the model's forward on the meta device (1 x 16 tokens) raised " \
                               "RuntimeError: no backward yet" in err, err
    assert f"{path} (runs: differential): model.attention.variant = 'differential': layer 0: " \
           "differential attention under position rope" in err and "head_dim (6) must be a multiple of 4" in err, err
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out)]) == 2
    assert "3 problems in config" in capsys.readouterr().err
    assert not out.exists()


def test_an_empty_grid_or_run_key_is_named_as_such_not_an_unknown_section(tmp_path, capsys):
    """`grid: {"": [2]}` set a config section named "" on every run: "unknown section; valid: plugins, ...", as if the
    key were a misspelt section; a key path with an empty part (`model..depth`) read as an unknown key `model.`."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"": [2], "model..depth": [1]}, "runs": {"a": {" ": 3}}}))
    assert main(["ablate", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problems in config" in err and "unknown" not in err and "Traceback" not in err, err
    assert f"{path}: grid = '': an empty key path; a grid key is a dotted config path such as " \
           "model.attention.variant" in err, err
    assert f"{path}: grid = 'model..depth': the key path has an empty part; a grid key is a dotted config path" in err
    assert f"{path}: runs.a = ' ': an empty key path; a key of a run is a dotted config path such as " \
           "model.attention.variant" in err, err


def test_a_seed_outside_torchs_range_is_named_at_seeds_once(tmp_path):
    """torch reads seed -1 as 2**64 - 1 (another run's): refused at `seeds:` itself, once per bad seed, rather
    than as every run's train.seed."""
    path = sweep_file(tmp_path, grid={"model.attention.variant": ["vanilla", "selective"]}, seeds=[-1, 3, 2**64])
    with pytest.raises(ConfigError) as info:
        read_sweep_file(path)
    problems = info.value.problems
    assert [(p.path, p.value) for p in problems] == [("seeds", -1), ("seeds", 2**64)]
    assert "torch would read -1 as 18446744073709551615" in problems[0].message
    assert read_sweep_file(sweep_file(tmp_path, seeds=[0, 2**64 - 1])).seeds == [0, 2**64 - 1]


def test_a_metric_the_dataset_does_not_report_is_named_for_every_run_with_the_other_problems(tmp_path, capsys):
    """The metric was checked only for runs whose config and plan were valid: with one run's variant misspelt and
    another's seq_len too long, the metric's problem named the remaining runs ("runs: ...") and, had every run
    another problem, showed only after those were fixed. It needs only the data section: "every run", at once."""
    path = sweep_file(tmp_path, metric="val.accuracy",
                      grid={"model.attention.variant": ["vanilla", "selectve"]},
                      runs={"long": {"train.seq_len": 32}})
    assert main(["ablate", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problems in config" in err, err
    assert (f"{path} (every run): metric = 'val.accuracy': dataset 'shakespeare' does not report it; "
            "valid here: val.bpb, val.loss") in err, err
    assert f"{path} (runs: variant=selectve): model.attention.variant = 'selectve': unknown variant" in err, err
    assert f"{path} (runs: long): train.seq_len = 32: longer than model.max_seq_len (16)" in err, err


def test_the_documented_sweep_problems_are_what_ablate_prints(isolated_registry, tmp_path, monkeypatch, capsys):
    """docs/ablations.md's example of every problem at once, run as written: its sweep file and plug-in in a
    configs/ablations folder beside a copy of configs/train/shakespeare_tiny.yaml; the printed problems are the
    doc's, word for word (the plug-in's path aside)."""
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "ablations.md").read_text()
    example = doc[doc.index("**Everything is validated before anything trains.**"):]
    sweep_yaml = re.search(r"```yaml\n(.*?)```", example, re.S).group(1)
    kernel = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    command, *expected = re.search(r"```\n\$ (.*?)```", example, re.S).group(1).rstrip("\n").split("\n")
    assert command == ("cd configs/ablations && PYTHONPATH=. attention-zoo ablate sweep.yaml --dry-run "
                       "--set 'plugins=[my_kernel]'")
    folder = tmp_path / "configs" / "ablations"
    folder.mkdir(parents=True)
    (tmp_path / "configs" / "train").mkdir()
    (tmp_path / "configs" / "train" / "shakespeare_tiny.yaml").write_text(
        (root / "configs" / "train" / "shakespeare_tiny.yaml").read_text())
    (folder / "sweep.yaml").write_text(sweep_yaml)
    (folder / "my_kernel.py").write_text(kernel)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    assert main(["ablate", "sweep.yaml", "--dry-run", "--set", "plugins=[my_kernel]"]) == 2
    printed = capsys.readouterr().err.replace(str(folder / "my_kernel.py"),
                                              "/home/me/attention-zoo/configs/ablations/my_kernel.py")
    assert printed.rstrip("\n").split("\n") == expected


def selective_base_sweep(tmp_path: Path, **spec) -> Path:
    """A sweep whose base is selective attention with a selection-only option (selection_head) and a shared one."""
    path = sweep_file(tmp_path, **spec)
    data = yaml.safe_load(path.read_text())
    data["base"]["model"]["attention"] = {"variant": "selective", "selection_head": 1, "kv_heads": 1}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_run_that_changes_the_variant_drops_the_base_variants_own_options_as_layers_does(tmp_path):
    path = selective_base_sweep(tmp_path, grid={"model.attention.variant": ["vanilla", "selective"]},
                                runs={"gqa": {"model.attention.variant": "gqa", "model.attention.qk_norm": True}})
    attention = {run.label: run.config["model"]["attention"] for run in read_sweep_file(path).runs}
    assert attention == {  # kv_heads is every variant's option: kept; selection_head only selective's
        "variant=vanilla": {"variant": "vanilla", "kv_heads": 1},
        "variant=selective": {"variant": "selective", "selection_head": 1, "kv_heads": 1},
        "gqa": {"variant": "gqa", "kv_heads": 1, "qk_norm": True},
    }
    # the same as a `layers:` override naming vanilla over the selective default
    layered = {**BASE["model"], "attention": {"variant": "selective", "selection_head": 1, "kv_heads": 1},
               "layers": [{"at": [0, 1], "attention": {"variant": "vanilla"}}]}
    from attention_zoo.config import load_config, resolved_layers
    by_layers = resolved_layers(load_config({"model": layered})["model"])[0]
    by_grid = resolved_layers(load_config({"model": {**BASE["model"], "attention": attention["variant=vanilla"]}})["model"])[0]
    assert by_layers == by_grid


def test_an_option_a_run_sets_that_its_new_variant_lacks_is_still_refused_at_its_key(tmp_path):
    path = selective_base_sweep(tmp_path, runs={"bad": {"model.attention.variant": "vanilla",
                                                        "model.attention.selection_head": 0}})
    with pytest.raises(ConfigError) as err:
        read_sweep_file(path)
    [problem] = err.value.problems
    assert problem.source.endswith("(every run)") and problem.path == "model.attention.selection_head"
    assert problem.value == 0 and "vanilla" in problem.message and "kv_heads" in problem.message


def test_a_sweeps_base_is_named_as_written(tmp_path, monkeypatch):
    """A sweep's base file was named by its absolute path in its problems, and a missing one as a config file that
    is not there; both are now named as the user wrote them, a missing one at the sweep's `base` key."""
    from attention_zoo.config import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "bad.yaml").write_text("model: {dim: 30, heads: 4}\n")
    (tmp_path / "sweeps" / "s.yaml").write_text("base: ../bad.yaml\ngrid: {model.depth: [1, 2]}\n")
    (tmp_path / "sweeps" / "gone.yaml").write_text("base: gone_base.yaml\ngrid: {model.depth: [1, 2]}\n")
    with pytest.raises(ConfigError) as info:
        read_sweep_file("sweeps/s.yaml")
    assert "bad.yaml: model.heads = 4" in str(info.value) and str(tmp_path) not in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:
        read_sweep_file("sweeps/gone.yaml")
    assert ("sweeps/gone.yaml: base = 'gone_base.yaml': file not found (looked for sweeps/gone_base.yaml, beside "
            "sweeps/gone.yaml)") in str(info.value), str(info.value)


def test_a_variant_change_drops_options_an_inline_bases_own_base_file_sets(tmp_path, monkeypatch):
    """The drop saw only the inline base mapping: options from that mapping's own `base:` file were merged later by
    load_config and refused (`selection_head ... unknown parameter for variant 'vanilla'`)."""
    monkeypatch.chdir(tmp_path)
    parent = {**BASE, "model": {**BASE["model"], "attention": {"variant": "selective", "selection_head": 1}}}
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(parent))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": {"base": "parent.yaml", "train": {"steps": 3}},
                                    "grid": {"model.attention.variant": ["vanilla", "selective"]}}))
    runs = {run.label: run.config for run in read_sweep_file(path).runs}
    assert runs["variant=vanilla"]["model"]["attention"] == {"variant": "vanilla"}
    assert runs["variant=selective"]["model"]["attention"]["selection_head"] == 1
    assert runs["variant=vanilla"]["train"]["steps"] == 3 and runs["variant=vanilla"]["model"]["dim"] == 16


def test_a_variant_change_to_a_plugin_variant_drops_the_base_options_whatever_the_run_order(
        tmp_path, monkeypatch, isolated_registry):
    """A plug-in variant is known by name only once the base's `plugins:` are imported (by the first run's
    load_config): a grid listing it first refused the base's selection_head, listing it second did not."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "zoo_order_plugin.py").write_text(
        "from attention_zoo.variant_registry import register_variant\n"
        "from attention_zoo.variants.vanilla import Vanilla\n\n\n"
        "@register_variant('zoo_order_vanilla')\nclass OrderVanilla(Vanilla):\n    pass\n")
    path = selective_base_sweep(tmp_path, grid={"model.attention.variant": ["zoo_order_vanilla", "vanilla"]})
    data = yaml.safe_load(path.read_text())
    data["base"]["plugins"] = ["zoo_order_plugin"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    runs = {run.label: run.config["model"]["attention"] for run in read_sweep_file(path).runs}
    assert runs["variant=zoo_order_vanilla"] == {"variant": "zoo_order_vanilla", "kv_heads": 1}
