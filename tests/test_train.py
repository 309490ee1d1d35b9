"""Training: config sections, schedule, optimizer groups, exact resume, gradient accumulation, metrics,
auxiliary losses, and the train/eval commands' error handling."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from attention_zoo.cli import main
from attention_zoo.config import ConfigError, Field, build_model, load_config
from attention_zoo.data import IGNORE_INDEX, build_dataset
from attention_zoo.errors import UserError
from attention_zoo.ops.selection import penalty_tensor
from attention_zoo.train import aux_losses, evaluate, train
from attention_zoo.train.metrics import read_jsonl
from attention_zoo.train.optim import build_optimizer, lr_factor

ROOT = Path(__file__).resolve().parents[1]



def tiny(variant: str = "vanilla", **train_overrides) -> dict:
    """A model small enough that a handful of steps takes well under a second."""
    return {
        "model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 32, "attention": {"variant": variant}},
        "data": {"name": "shakespeare"},
        "train": {"steps": 8, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup": 2, "eval_every": 4,
                  "eval_batches": 2, "checkpoint_every": 3, "log_every": 1, "device": "cpu", **train_overrides},
    }


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


# ----------------------------------------------------------------------------- config sections


def test_train_section_defaults_and_every_problem_at_once():
    config = load_config({})
    assert config["train"]["steps"] > 0 and config["train"]["grad_accum"] == 1 and config["train"]["aux_losses"] == {}
    assert config["data"] == load_config({"data": {}})["data"] == {"name": "shakespeare"}
    with pytest.raises(ConfigError) as err:
        load_config({"train": {"stpes": 10, "lr": "fast", "batch_size": 6, "grad_accum": 4, "device": "gpu"},
                     "data": {"name": "shakespear"}})
    text = str(err.value)
    assert "train.stpes" in text and "did you mean 'steps'" in text
    assert "train.lr = 'fast'" in text and "expected float" in text
    assert "train.grad_accum = 4" in text and "must divide train.batch_size (6)" in text
    assert "train.device = 'gpu'" in text
    assert "data.name = 'shakespear'" in text and "did you mean 'shakespeare'" in text
    assert len(err.value.problems) == 5


def test_data_section_is_checked_without_reading_the_corpus(monkeypatch):
    from attention_zoo.data import corpus

    def never(*a, **k):
        raise AssertionError("validation must not read the corpus")

    monkeypatch.setattr(corpus, "shakespeare_works", never)
    load_config({"data": {"name": "shakespeare"}})
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"name": "shakespeare", "text": "x.txt"}})
    assert ("data.text = 'x.txt': unknown key for dataset 'shakespeare' (a key of dataset text; data.name is "
            "'shakespeare')" in str(err.value))
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"name": "variable_assignment", "num_vars": 99, "num_asignments": 3}})
    assert "data.num_asignments" in str(err.value) and "did you mean 'num_assignments'" in str(err.value)
    with pytest.raises(ConfigError, match=r"data.text = 'no/such/file.txt': no such file"):
        load_config({"data": {"text": "no/such/file.txt"}})


def test_every_problem_of_the_data_section_is_reported_at_once():
    """Each bad key of a task, an unknown key among them, and each bad entry of a curriculum is its own problem."""
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"name": "variable_assignment", "value_digits": 12, "num_assignments": 3,
                              "loss_on": "none", "num_queries": 0, "num_var": 2}})
    assert {(p.path, p.value) for p in err.value.problems} == {
        ("data.value_digits", 12), ("data.loss_on", "none"), ("data.num_queries", 0), ("data.num_var", 2)}
    assert "<dict>: data.value_digits = 12: expected an integer from 1 to 9" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"name": "variable_assignment", "num_assignments": {5: 0, -1: 2}, "num_vars": 0}})
    assert [p.path for p in err.value.problems] == [
        "data.num_vars", "data.num_assignments[5]", "data.num_assignments[-1]", "data.num_assignments"]


def test_seq_len_checked_against_model_and_task():
    from attention_zoo.train import plan_run

    with pytest.raises(ConfigError, match=r"train.seq_len = 64: longer than model.max_seq_len \(32\)"):
        plan_run(load_config(tiny(seq_len=64)))
    task = tiny(seq_len=None)
    task["data"] = {"name": "variable_assignment", "num_assignments": 4}
    example = 4 * (3 + 1) + 3 + 1  # docs/data.md: num_assignments * (3 + value_digits) + 3 + value_digits
    assert plan_run(load_config(task)).seq_len == example - 1  # null: the task's own example length
    task["train"]["seq_len"] = 10
    with pytest.raises(ConfigError, match=f"needs at least {example - 1}"):
        plan_run(load_config(task))


# ----------------------------------------------------------------------------- optimizer


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup=10, steps=110, min_ratio=0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then never rising
    assert f[-1] == pytest.approx(0.1) and f[60] == pytest.approx(0.55, abs=0.01)  # half-way down the cosine


def test_weight_decay_only_on_matrices():
    config = load_config(tiny())
    model = build_model(config)
    opt = build_optimizer(model, config["train"], torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()


# ----------------------------------------------------------------------------- the loop


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, capsys):
    config = load_config(tiny("selective"))
    whole = train(config, tmp_path / "whole", progress=False)
    capsys.readouterr()
    partial = train(config, tmp_path / "split", stop_after=5, progress=False)
    assert partial["stopped_at"] == 5 and not (tmp_path / "split" / "final.json").exists()
    assert (f"stopped after step 5 of 8 (--stop-after); checkpoint in {tmp_path / 'split' / 'checkpoint'}: continue "
            "with --resume") in capsys.readouterr().out
    with pytest.raises(UserError, match="--stop-after 5: the run is already at step 5; give a later step"):
        train(config, tmp_path / "split", resume=True, stop_after=5, progress=False)
    # a killed run may have logged past its last checkpoint; resuming drops and redoes that
    with (tmp_path / "split" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "train", "step": 6, "loss": 123.0}) + "\n")
    resumed = train(config, tmp_path / "split", resume=True, progress=False)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["val"] == whole["val"]
    a, b = records(tmp_path / "whole", "train"), records(tmp_path / "split", "train")
    assert [r["step"] for r in b] == list(range(1, 9))  # no step twice, none missing
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert records(tmp_path / "whole", "val") == records(tmp_path / "split", "val")
    for name in ("model.safetensors", "config.yaml", "state.pt"):
        assert (tmp_path / "split" / "checkpoint" / name).is_file()


def test_resume_refuses_a_damaged_checkpoint_and_recovers_one_cut_short_between_renames(tmp_path):
    """A checkpoint that lost a file was taken for no checkpoint (the run started over from step 0 and wrote
    over it). A save killed between atomic_folder's two renames leaves the last complete checkpoint as
    .checkpoint.old: resuming continues from it, as the uninterrupted run does."""
    config = load_config(tiny("vanilla"))
    whole = train(config, tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    train(config, run, stop_after=5, progress=False)
    (run / "checkpoint" / "state.pt").rename(tmp_path / "state.pt")
    with pytest.raises(UserError, match=r"the checkpoint is damaged \(no state.pt\), so --resume cannot continue it"):
        train(config, run, resume=True, progress=False)
    with pytest.raises(UserError, match="already holds a run"):  # and without --resume it is still a run
        train(config, run, progress=False)
    (run / "checkpoint").rename(run / ".checkpoint.old")  # the first rename of a save done, the second not
    with pytest.raises(UserError, match=r"the checkpoint is damaged \(no state.pt\)"):  # incomplete: not taken
        train(config, run, resume=True, progress=False)  # for "no checkpoint" (which would start over)
    (tmp_path / "state.pt").rename(run / "checkpoint" / "state.pt")
    (run / "checkpoint").rename(run / ".checkpoint.old")
    resumed = train(config, run, resume=True, progress=False)
    assert resumed["train_loss"] == whole["train_loss"] and not (run / ".checkpoint.old").exists()


@pytest.mark.parametrize("step", ["0", "-1"])
def test_stop_after_must_be_a_step(tmp_path, capsys, step):
    code = main(["train", str(ROOT / "configs" / "vanilla.yaml"), "--stop-after", step, "--out", str(tmp_path / "r")])
    assert code == 2 and f"--stop-after {step}: must be a step >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_curriculum_follows_the_step_through_a_resume(tmp_path, monkeypatch):
    from attention_zoo.data.synthetic import VariableAssignment

    counts = []  # the number of assignments of each training batch, in order
    real = VariableAssignment.sample

    def spy(self, split, batch_size, seq_len, generator):
        batch = real(self, split, batch_size, seq_len, generator)
        if split == "train":
            counts.append(self.assignments_at(self._step))
        return batch

    monkeypatch.setattr(VariableAssignment, "sample", spy)
    config = tiny()
    config["data"] = {"name": "variable_assignment", "num_vars": 3, "num_assignments": {0: 2, 5: 4}}
    del config["train"]["seq_len"]  # one example
    config = load_config(config)
    train(config, tmp_path / "run", stop_after=4, progress=False)  # steps 0-3, checkpointed at the stop
    train(config, tmp_path / "run", resume=True, progress=False)  # steps 4-7
    assert counts == [2, 2, 2, 2, 2, 4, 4, 4]  # the schedule switches at step 5 wherever the run resumed


@pytest.mark.parametrize("aux", [False, True], ids=["plain", "aux_loss"])
def test_gradient_accumulation_does_not_change_the_run(tmp_path, aux, penalty_loss):
    """The same run in 4 micro-batches: the loss, every aux term and the gradient norm (Adam would hide a
    gradient off by a constant factor, so the loss alone cannot tell) match the run in one."""
    extra = {"aux_losses": {"test_penalty_mean": {"weight": 5.0}}} if aux else {}
    variant = "selective" if aux else "vanilla"
    one = train(load_config(tiny(variant, **extra)), tmp_path / "one", progress=False)
    four = train(load_config(tiny(variant, grad_accum=4, **extra)), tmp_path / "four", progress=False)
    pairs = list(zip(records(tmp_path / "one", "train"), records(tmp_path / "four", "train")))
    assert len(pairs) == 8
    for r1, r4 in pairs:
        assert r1["loss"] == pytest.approx(r4["loss"], abs=1e-5)
        assert r1["grad_norm"] == pytest.approx(r4["grad_norm"], rel=1e-4)
        if aux:
            assert r1["aux.test_penalty_mean"] == pytest.approx(r4["aux.test_penalty_mean"], rel=1e-4)
    assert one["val"]["loss"] == pytest.approx(four["val"]["loss"], abs=1e-5)


def test_training_lowers_the_loss_and_logs_everything(tmp_path):
    summary = train(load_config(tiny(steps=30, eval_every=10, lr=1e-2)), tmp_path, progress=False)
    train_recs = records(tmp_path, "train")
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5
    assert set(train_recs[0]) >= {"step", "loss", "lr", "tokens_per_s", "grad_norm"}
    assert [r["step"] for r in records(tmp_path, "val")] == [10, 20, 30]
    assert summary["val"]["bpb"] == pytest.approx(summary["val"]["loss"] / math.log(2))
    assert summary["params"] == build_model(load_config(tiny())).num_parameters()
    assert summary["tokens_per_s"] > 0 and summary["peak_mem_mb"] > 0


class ConstantPredictor(torch.nn.Module):
    """Always predicts byte `token`: its accuracy is the share of answers equal to that byte."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, 256)
        logits[..., self.token] = 10.0
        return logits


def test_task_accuracy_is_exact_match_on_the_answer():
    data = build_dataset({"name": "variable_assignment", "num_assignments": 6, "eval_examples": 64})
    batches = list(data.eval_batches("val", 16, data.fixed_seq_len))
    answers = torch.cat([b.targets[b.metric_mask] for b in batches])
    for token in (ord("3"), ord("7")):
        metrics = evaluate(ConstantPredictor(token), data, "val", 16, data.fixed_seq_len, None, torch.device("cpu"))
        assert metrics["accuracy"] == pytest.approx((answers == token).float().mean().item())
        assert "bpb" not in metrics
    scored = torch.cat([b.targets for b in batches])
    assert (scored != IGNORE_INDEX).sum() == len(answers)  # loss_on: answer scores the answers only


@pytest.fixture
def penalty_loss():
    """Registers `test_penalty_mean` (the mean selection penalty, weighted) for one test."""
    seen = []

    @aux_losses.register_aux_loss("test_penalty_mean", fields={"weight": Field(float, 1.0, "weight", minimum=0)})
    def penalty_mean(per_layer, params, model):
        seen.append([sorted(u) for u in per_layer])
        return params["weight"] * torch.stack([penalty_tensor(u["selection_penalty"]).mean() for u in per_layer]).mean()

    yield seen
    aux_losses.AUX_LOSSES.pop("test_penalty_mean")


def test_aux_loss_hook_gets_each_layers_state_and_is_logged(tmp_path, penalty_loss):
    seen = penalty_loss
    base = train(load_config(tiny("selective")), tmp_path / "base", progress=False)
    config = load_config(tiny("selective", aux_losses={"test_penalty_mean": {"weight": 5.0}}))
    with_aux = train(config, tmp_path / "aux", progress=False)
    assert seen and seen[0] == [["selection_penalty"], ["selection_penalty"]]
    logged = records(tmp_path / "aux", "train")
    assert all("aux.test_penalty_mean" in r and r["aux.test_penalty_mean"] >= 0 for r in logged)
    assert with_aux["val"]["loss"] != base["val"]["loss"]  # the term reached the gradients
    with pytest.raises(ConfigError) as err:
        load_config(tiny(aux_losses={"test_penalty_maen": {}, "test_penalty_mean": {"weight": -1.0}}))
    assert "did you mean 'test_penalty_mean'" in str(err.value)
    assert "train.aux_losses.test_penalty_mean.weight = -1.0: must be >= 0" in str(err.value)


def test_aux_loss_registry_skips_a_missing_provider_and_reports_a_broken_one(monkeypatch, tmp_path):
    monkeypatch.setattr(aux_losses, "_providers_loaded", False)
    monkeypatch.setattr(aux_losses, "PROVIDER_FAILURES", [])
    monkeypatch.setattr(aux_losses, "PROVIDERS", ["attention_zoo.no_such_module.losses", "json.no_such_child"])
    aux_losses.aux_loss_names()
    assert aux_losses.PROVIDER_FAILURES == []  # a provider that is not there is skipped quietly
    monkeypatch.setattr(aux_losses, "_providers_loaded", False)
    (tmp_path / "broken_provider_xyz.py").write_text("import a_dependency_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(aux_losses, "PROVIDERS", ["broken_provider_xyz"])
    aux_losses.aux_loss_names()  # a provider whose own import fails is reported, not raised
    assert len(aux_losses.PROVIDER_FAILURES) == 1 and "a_dependency_nobody_installed" in aux_losses.PROVIDER_FAILURES[0]
    with pytest.raises(ConfigError, match="providers that failed to import: broken_provider_xyz"):
        load_config(tiny(aux_losses={"selective_memroy": {}}))


# ----------------------------------------------------------------------------- commands


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_and_eval_commands(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=4, eval_every=0)))
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", str(cfg), "train.lr=2e-3", "--out", str(out), "--no-progress")
    assert code == 0, err
    final = json.loads((out / "final.json").read_text())
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 2e-3  # `2e-3` read as a number
    code, _, err = cli(capsys, "train", str(cfg), "--out", str(out))
    assert code == 2 and "pass --resume" in err

    code, _, err = cli(capsys, "eval", str(out), "--json", str(tmp_path / "eval.json"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["loss"] == pytest.approx(final["val"]["loss"], abs=1e-6)  # same batches, same weights
    assert metrics["tokens"] == final["val"]["tokens"] == 2 * 4 * 32  # eval_batches x batch_size x seq_len, all scored
    code, stdout, err = cli(capsys, "eval", str(out / "checkpoint"), "--data", "name=variable_assignment",
                            "num_assignments=4", "--split", "test", "--batches", "2")
    assert code == 0, err
    assert json.loads(stdout)["dataset"] == "variable_assignment" and "accuracy" in json.loads(stdout)

    code, _, err = cli(capsys, "train", str(cfg), "train.stepz=3", "model.heads=3", "--out", str(tmp_path / "bad"))
    assert code == 2 and "train.stepz" in err and "did you mean 'steps'" in err and "model.heads" in err
    code, _, err = cli(capsys, "eval", str(out), "--data", "name=variable_asignment")
    assert code == 2 and "did you mean 'variable_assignment'" in err
    code, _, err = cli(capsys, "eval", str(tmp_path))
    assert code == 2 and "not a checkpoint" in err
    # flags: 0 is refused, not read as "the run's own value"; --json must be a file; --device is checked
    for args, message in ((("--batches", "-1"), "--batches -1: must be >= 1"),
                          (("--batches", "0"), "--batches 0: must be >= 1"),
                          (("--batch-size", "0"), "--batch-size 0: must be >= 1"),
                          (("--json", str(tmp_path)), f"--json {tmp_path}: is a folder"),
                          (("--device", "tpu"), "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
                          # the flag is named, not the checkpoint's train.seq_len (which the user cannot change)
                          (("--seq-len", "1000"), f"eval of {out / 'checkpoint' / 'config.yaml'}: --seq-len = 1000: "
                                                  "longer than model.max_seq_len (32); give a shorter --seq-len")):
        code, stdout, err = cli(capsys, "eval", str(out), *args)
        assert code == 2 and message in err and err.count("error:") == 1 and not stdout, (args, err)


def test_train_into_the_folder_of_its_own_config_is_refused_before_anything_is_written(tmp_path, capsys):
    """`train exp/config.yaml --out exp` replaced the user's config.yaml (comments, base: line) with the run's."""
    exp = tmp_path / "exp"
    exp.mkdir()
    mine = "# my experiment\n" + yaml.safe_dump(tiny(steps=2, eval_every=0))
    (exp / "config.yaml").write_text(mine)
    code, _, err = cli(capsys, "train", str(exp / "config.yaml"), "--out", str(exp), "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert f"{exp} holds config.yaml but no run" in err and "choose another --out" in err
    assert (exp / "config.yaml").read_text() == mine and sorted(p.name for p in exp.iterdir()) == ["config.yaml"]
    code, _, err = cli(capsys, "train", str(exp / "config.yaml"), "--out", str(exp / "run"), "--no-progress")
    assert code == 0, err  # a subfolder is fine
    # --resume does not get past it (the refusal once suggested it, and it replaced the user's file)
    code, _, err = cli(capsys, "train", str(exp / "config.yaml"), "--out", str(exp), "--resume", "--no-progress")
    assert code == 2 and "with or without --resume" in err and (exp / "config.yaml").read_text() == mine
    # a run stopped before its first log holds an empty metrics.jsonl beside its config.yaml: it resumes
    shutil.rmtree(exp / "run" / "checkpoint")
    (exp / "run" / "final.json").unlink()
    (exp / "run" / "metrics.jsonl").write_text("")
    code, out, err = cli(capsys, "train", str(exp / "config.yaml"), "--out", str(exp / "run"), "--resume", "--no-progress")
    assert code == 0 and "starting from step 0" in out, err


def test_text_shorter_than_a_window_is_refused_before_anything_is_written(tmp_path, capsys):
    text = tmp_path / "mid.txt"
    text.write_text("abcdefghij" * 30)  # 301 bytes: val 30, test 15, each less than seq_len + 1 = 33
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=2, eval_every=0)))
    code, _, err = cli(capsys, "train", str(cfg), f"data={{text: {text}}}", "--out", str(tmp_path / "run"),
                       "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert f"data.text = '{text}'" in err and "split 'val'" in err and "30 tokens" in err and "train.seq_len = 32" in err
    assert "split 'test'" in err and "15 tokens" in err and "split 'train'" not in err
    assert not (tmp_path / "run").exists()  # no config.yaml, no checkpoint: a rerun is not "already holds a run"


def test_resume_refuses_other_data_other_train_settings_and_fewer_steps(tmp_path):
    from attention_zoo.errors import UserError

    run = tmp_path / "run"
    train(load_config(tiny(steps=6, eval_every=0)), run, stop_after=3, progress=False)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    text = tmp_path / "other.txt"
    text.write_text("some other text " * 200)
    other = tiny(steps=6, eval_every=0, lr=1e-3, seed=1)
    other["data"] = {"text": str(text)}
    with pytest.raises(UserError) as exc:
        train(load_config(other), run, resume=True, progress=False)
    message = str(exc.value)
    assert "data.name: checkpoint 'shakespeare', config 'text'" in message and "data.text" in message
    assert "train.lr: checkpoint 0.003, config 0.001" in message and "train.seed: checkpoint 0, config 1" in message
    with pytest.raises(UserError, match="already at step 3; raise train.steps above 3"):
        train(load_config(tiny(steps=2, eval_every=0)), run, resume=True, progress=False)
    with pytest.raises(UserError, match="already at step 3"):
        train(load_config(tiny(steps=3, eval_every=0)), run, resume=True, progress=False)
    assert {name: (run / name).read_bytes() for name in before} == before  # refusals leave the run as it was
    assert not (run / "final.json").exists()
    # raising steps and changing how the run is executed or logged is fine
    summary = train(load_config(tiny(steps=8, eval_every=0, eval_batches=1, log_every=2)), run, resume=True,
                    progress=False)
    assert summary["steps"] == 8 and [r["step"] for r in records(run, "val")] == [8]


def test_failed_init_from_writes_nothing_and_a_run_folder_is_accepted(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=2, eval_every=0, eval_batches=1)))
    base = tmp_path / "base"
    assert cli(capsys, "train", str(cfg), "--out", str(base), "--no-progress")[0] == 0
    code, _, err = cli(capsys, "train", str(cfg), "train.init_from=/nonexistent", "--out", str(tmp_path / "a"))
    assert code == 2 and "not a checkpoint folder" in err and not (tmp_path / "a").exists()
    code, _, err = cli(capsys, "train", str(cfg), f"train.init_from={base}", "model.dim=64", "--out",
                       str(tmp_path / "b"))
    assert code == 2 and "model.dim: checkpoint 32, config 64" in err and not (tmp_path / "b").exists()
    # a run folder, as eval and generate take it: its checkpoint/ starts the run
    code, _, err = cli(capsys, "train", str(cfg), f"train.init_from={base}", "train.lr=0", "train.warmup=0",
                       "--out", str(tmp_path / "c"), "--no-progress")
    assert code == 0, err
    from safetensors.torch import load_file

    start = load_file(base / "checkpoint" / "model.safetensors")
    after = load_file(tmp_path / "c" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(start[k], after[k]) for k in start)  # lr 0: the weights it started from


def test_a_variant_default_written_out_is_no_difference_for_init_from_or_resume(tmp_path):
    """The model sections are compared as built (each layer's variant with its parameters resolved), not as
    written: `{variant: selective}` and `{variant: selective, selection_head: 0, protect_bos: true}` are one model,
    and so is a per-layer override that repeats the default attention."""
    from attention_zoo.errors import UserError

    run = tmp_path / "run"
    train(load_config(tiny("selective", steps=4, eval_every=0)), run, stop_after=3, progress=False)
    spelled = tiny("selective", steps=4, eval_every=0)
    spelled["model"]["attention"].update(selection_head=0, protect_bos=True)
    spelled["model"]["layers"] = [{"at": [1], "attention": {"variant": "selective"}}]
    summary = train(load_config(spelled), run, resume=True, progress=False)
    assert summary["steps"] == 4
    finetune = tiny("selective", steps=1, eval_every=0, init_from=str(run))
    finetune["model"]["attention"].update(selection_head=0)
    train(load_config(finetune), tmp_path / "finetuned", progress=False)
    other = tiny("selective", steps=1, eval_every=0, init_from=str(run))
    other["model"]["attention"].update(selection_head=1)  # a real difference is still refused
    with pytest.raises(UserError, match=r"model\.attention\.selection_head: checkpoint 0, config 1"):
        train(load_config(other), tmp_path / "other", progress=False)
    other["model"]["attention"].update(selection_head=0)
    other["model"]["layers"] = [{"at": [1], "attention": {"variant": "vanilla"}}]  # one layer differs: named by layer
    with pytest.raises(UserError, match=r"model\.attention\.layer 1\.variant: checkpoint 'selective', config 'vanilla'"):
        train(load_config(other), tmp_path / "other", progress=False)


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    first = train(load_config(tiny(steps=3, eval_every=0)), run, progress=False)
    capsys.readouterr()
    again = train(load_config(tiny(steps=3, eval_every=0)), run, resume=True, progress=False)
    assert again == first and f"{run} already finished at step 3 (train.steps); nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["selective", "vanilla"])
def test_a_kernel_built_on_first_use_is_built_before_the_first_timed_step(tmp_path, monkeypatch, variant):
    """The CPU selective kernel (about a minute to build on a fresh machine) is built by the model's warm-up
    forward, before the first step's timer starts, so the first step's time and the run's tokens/s do not include
    it; a model that never calls it (vanilla) never builds it."""
    import time as real_time
    import types

    import attention_zoo.train.loop as loop
    from attention_zoo.ops.selection import cpu_fused

    events = []
    build = cpu_fused._build
    monkeypatch.setattr(cpu_fused, "_state", {})  # as in a fresh process
    monkeypatch.setattr(cpu_fused, "_build", lambda: events.append("build") or build())
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("timer") or real_time.perf_counter())
    monkeypatch.setattr(loop, "time", clock)
    train(load_config(tiny(variant, steps=1, eval_every=1, checkpoint_every=1)), tmp_path, progress=False)
    assert "timer" in events
    if variant == "selective":
        assert events.index("build") < events.index("timer") and events.count("build") == 1
    else:
        assert "build" not in events


@pytest.mark.parametrize("device, missing", [("cuda", "CUDA"), ("cuda:1", "CUDA"), ("mps", "MPS")])
def test_a_device_torch_does_not_see_is_refused_before_the_run(tmp_path, capsys, device, missing):
    """Validation accepts the device words (a config may be written for another machine); the run refuses a
    device this torch cannot reach, by name, before writing anything (mps crashed inside torch)."""
    if device.startswith("cuda") and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    code = main(["train", str(ROOT / "configs" / "vanilla.yaml"), f"train.device={device}", "--out", str(tmp_path / "r")])
    assert code == 2 and f"train.device = {device!r}, but torch sees no {missing} device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("load, policy, device, hinted", [(2.5, None, "cpu", True), (2.0, None, "auto", True),
                                                          (1.8, None, "cpu", True), (1.2, None, "cpu", False),
                                                          (4.0, "PASSIVE", "cpu", False), (4.0, "ACTIVE", "cpu", False),
                                                          (4.0, None, "cuda", False)])
def test_a_command_says_when_a_busy_cpu_will_slow_it(monkeypatch, load, policy, device, hinted):
    """On 2 cores that are already busy, with no OMP_WAIT_POLICY chosen, a command says what to set (a quickstart
    step ran 20x slower with spinning threads; train 22x at a load of 1.8, which the old rule, load >= cores,
    let pass); set either way, or on a quiet machine, it says nothing."""
    import os

    from attention_zoo.env import busy_cpu_hint

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    hint = busy_cpu_hint("generate", device)
    assert (hint is not None) == hinted
    if hinted:
        assert f"attention-zoo generate: this CPU is busy (load {load:.1f} on 2 cores)" in hint
        assert "OMP_WAIT_POLICY=PASSIVE attention-zoo generate" in hint


def test_eval_data_items_that_switch_dataset_drop_the_old_ones_keys(tmp_path):
    """`eval RUN --data name=variable_assignment` on a run trained on a text file kept the run's `text` key and
    was refused with "set data.name too", which the user had done; a tokenizer (any corpus reads it) stays."""
    from attention_zoo.commands.eval import data_spec

    run = {"name": "text", "text": "/corpus.txt", "tokenizer": "/tok"}
    assert data_spec(["name=variable_assignment", "num_vars=4"], run) == {"name": "variable_assignment", "num_vars": 4}
    assert data_spec(["name=shakespeare"], run) == {"name": "shakespeare", "tokenizer": "/tok"}
    assert data_spec(["text=/other.txt"], {"name": "shakespeare"}) == {"name": "text", "text": "/other.txt"}
    assert data_spec(["text=/other.txt"], run) == {**run, "text": "/other.txt"}  # same dataset: an edit
    load_config({"data": data_spec(["name=variable_assignment", "num_vars=4"], run)})  # and it validates
    with pytest.raises(ConfigError, match=r"--data: data.name = 'shakespeare': items are keys of the data section: "
                                          r"write name=shakespeare"):
        data_spec(["data.name=shakespeare"], run)


def test_eval_data_file_is_read_as_train_reads_a_config(tmp_path, capsys, monkeypatch):
    """`eval RUN --data sub/d.yaml` took d.yaml's relative `text:` from the working directory only (and said it had
    tried beside the file); it follows the file's base: chain and resolves beside it, as train does."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=1, eval_every=0)))
    assert cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")[0] == 0
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "corpus.txt").write_text("a small corpus of text " * 40)
    (tmp_path / "sub" / "base.yaml").write_text("data: {text: corpus.txt}\n")
    (tmp_path / "sub" / "d.yaml").write_text("base: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "eval", "run", "--data", "sub/d.yaml", "--batches", "1", "--seq-len", "16")
    assert code == 0, err
    assert json.loads(out)["dataset"] == "text:corpus.txt"


def test_eval_on_another_corpus_reads_it_at_the_runs_length(tmp_path, capsys):
    """`eval RUN --data name=...` read a corpus at model.max_seq_len, not at the seq_len the run trained at (a model
    trained on 16 tokens scored at 32, without a word); a task's examples keep their own length."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=1, eval_every=0, seq_len=16)))
    assert cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")[0] == 0
    (tmp_path / "corpus.txt").write_text("a small corpus of text " * 40)
    code, out, err = cli(capsys, "eval", str(tmp_path / "run"), "--data", f"text={tmp_path / 'corpus.txt'}",
                         "--batches", "1")
    assert code == 0 and json.loads(out)["seq_len"] == 16, err
    code, out, err = cli(capsys, "eval", str(tmp_path / "run"), "--data", "name=variable_assignment", "num_vars=2",
                         "num_assignments=2", "num_queries=1", "--batches", "1")
    assert code == 0 and json.loads(out)["seq_len"] not in (16, 32), err  # the task's own example length


def test_eval_data_whose_examples_do_not_fit_names_the_data_not_train_seq_len(tmp_path, capsys):
    """It said `train.seq_len = 99 ... raise model.max_seq_len`: the user set no seq_len, and a trained model's
    max_seq_len cannot be raised."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=1, eval_every=0)))
    assert cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")[0] == 0
    code, _, err = cli(capsys, "eval", str(tmp_path / "run"), "--data", "name=variable_assignment", "num_vars=4")
    assert code == 2 and "--data = {'name': 'variable_assignment', 'num_vars': 4}: its examples are 99 tokens, longer " \
                         "than model.max_seq_len (32); shorten them (fewer assignments or queries)" in err
    assert "train.seq_len" not in err and "raise model.max_seq_len" not in err


def test_resume_without_a_checkpoint_never_starts_another_run_over_a_finished_or_different_one(tmp_path, capsys,
                                                                                               monkeypatch):
    """--resume of a folder without checkpoint/ started over at step 0 whatever it held: a finished run's
    final.json was replaced by another model's run. And `train RUN --resume` (no --out) resumed into runs/RUN."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=2, eval_every=0)))
    run = tmp_path / "run"
    assert cli(capsys, "train", str(cfg), "--out", str(run), "--no-progress")[0] == 0
    shutil.rmtree(run / "checkpoint")
    code, _, err = cli(capsys, "train", str(cfg), "--out", str(run), "--resume", "--no-progress")
    assert code == 2 and "the run finished (final.json) but its checkpoint/ is gone" in err
    (run / "final.json").unlink()  # now a run killed before its first checkpoint
    before = (run / "metrics.jsonl").read_text()
    code, _, err = cli(capsys, "train", str(cfg), "model.dim=64", "train.seed=1", "--out", str(run), "--resume",
                       "--no-progress")
    assert code == 2 and "was trained with another config" in err
    # no checkpoint to compare with: the run's side is its config.yaml (it said `checkpoint 32`)
    assert "model.dim: the run's config.yaml 32, config 64" in err and "train.seed: the run's config.yaml 0, config 1" in err
    assert "checkpoint 32" not in err and "checkpoint 0" not in err
    assert (run / "metrics.jsonl").read_text() == before  # a refused resume truncates nothing
    code, out, err = cli(capsys, "train", str(run), "--resume", "--no-progress")  # the run folder itself
    assert code == 0 and f"no checkpoint in {run}; starting from step 0" in out, err
    assert (run / "final.json").exists() and not (tmp_path / "runs").exists()


def test_a_second_training_into_a_folder_another_training_holds_is_refused(tmp_path, capsys, monkeypatch):
    """Two `train` into one --out both ran when the second started before the first had written anything (it
    builds and warms up its model first: a minute for a kernel's first build), and two `--resume` of one run
    (a requeued job while the old one still runs, a sweep started twice) always did: their records interleaved
    in metrics.jsonl, config.yaml was one run's and checkpoint/ the other's, and one run's save deleted the
    other's staging folder (a SafetensorError traceback)."""
    from attention_zoo.train import loop

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=4, eval_every=0, checkpoint_every=2)))
    out = tmp_path / "run"
    second: list[tuple[int, str]] = []

    def start_another(*args):  # runs while the first training is preparing: nothing is written yet
        monkeypatch.setattr(loop, "own_attention_note", real_note)
        code, _, err = cli(capsys, "train", str(cfg), "train.lr=1e-3", "--out", str(out), "--no-progress")
        second.append((code, err))
        return real_note(*args)

    real_note = loop.own_attention_note
    monkeypatch.setattr(loop, "own_attention_note", start_another)
    assert train(load_config(str(cfg)), out, stop_after=2, progress=False)["stopped_at"] == 2
    [(code, err)] = second
    assert code == 2 and f"{out}: another `attention-zoo train` is writing into this folder" in err, err
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 3e-3  # the first run's, whole
    assert [r["step"] for r in records(out, "train")] == [1, 2]

    resumed: list[tuple[int, str]] = []
    real_append = loop.MetricsLog.append

    def resume_again(self, record):  # a second --resume while the first resumed run is training
        if not resumed:
            code, _, err = cli(capsys, "train", str(cfg), "--out", str(out), "--resume", "--no-progress")
            resumed.append((code, err))
        return real_append(self, record)

    monkeypatch.setattr(loop.MetricsLog, "append", resume_again)
    train(load_config(str(cfg)), out, resume=True, progress=False)
    [(code, err)] = resumed
    assert code == 2 and "another `attention-zoo train` is writing into this folder" in err, err
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    monkeypatch.setattr(loop.MetricsLog, "append", real_append)
    # the folder is free once the run ended, and a refused run into a new folder leaves no folder behind
    code, out_text, err = cli(capsys, "train", str(cfg), "--out", str(out), "--resume", "--no-progress")
    assert code == 0 and "already finished" in out_text, err
    code, _, err = cli(capsys, "train", str(cfg), "train.init_from=/nonexistent", "--out", str(tmp_path / "a" / "b"))
    assert code == 2 and not (tmp_path / "a").exists()


def test_a_diverged_run_never_replaces_its_last_good_checkpoint(tmp_path):
    """Without a progress bar (every sweep's runs, --no-progress) the loss was looked at only on log steps: with
    log_every 20 a run that diverged at step ~3 went on saving checkpoints of NaN weights over its last good one
    until step 20, then blamed step 20."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    config = load_config(tiny(steps=40, lr=1e6, warmup=0, log_every=20, checkpoint_every=1, eval_every=0))
    with pytest.raises(UserError) as exc:
        train(config, run, progress=False)
    step = torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"]
    weights = load_file(run / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values()), f"checkpoint of step {step} holds NaN weights"
    assert step < 20 and f"at step {step + 1}" in str(exc.value) and "lower train.lr" in str(exc.value)
    assert f"the checkpoint of step {step} is kept" in str(exc.value)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    """A folder holding a tiny byte-level BPE tokenizer (300 tokens) and `small.txt`, the text it was trained on."""
    pytest.importorskip("transformers")
    from attention_zoo.data.corpus import shakespeare_works
    from tests.tiny_tokenizer import train_bpe

    path = tmp_path_factory.mktemp("bpe")
    text = shakespeare_works()["hamlet"][:20_000]
    (path / "small.txt").write_bytes(text)
    train_bpe(text.decode()).save_pretrained(path / "tok")
    return path


def test_token_files_are_cached_only_in_a_run_that_trains(tmp_path, capsys, bpe_folder):
    """A run's tokenized splits are cached in OUT/tokens/. They were written before the run's checks, so a refused
    run left OUT/tokens/ behind ("a refused run leaves nothing behind"), and `eval` of a checkpoint folder that
    belongs to no run (a copy, one import-hf wrote) wrote tokens/ into that folder."""
    cfg = tmp_path / "tiny.yaml"
    config = tiny(steps=2, eval_every=0, eval_batches=1)
    config["model"]["vocab_size"] = 300
    config["data"] = {"text": str(bpe_folder / "small.txt"), "tokenizer": str(bpe_folder / "tok")}
    cfg.write_text(yaml.safe_dump(config))
    code, _, err = cli(capsys, "train", str(cfg), "train.init_from=/nonexistent", "--out", str(tmp_path / "refused"))
    assert code == 2 and "not a checkpoint folder" in err and not (tmp_path / "refused").exists()
    run = tmp_path / "run"
    assert cli(capsys, "train", str(cfg), "--out", str(run), "--no-progress")[0] == 0
    assert len(list((run / "tokens").glob("*.pt"))) == 3
    copy = tmp_path / "copy"
    shutil.copytree(run / "checkpoint", copy)
    before = sorted(p.name for p in copy.iterdir())
    code, stdout, err = cli(capsys, "eval", str(copy), "--batches", "1")
    assert code == 0 and "bpb" in stdout, err
    assert sorted(p.name for p in copy.iterdir()) == before


@pytest.mark.parametrize("key, value, message", [
    ("seed", 2**64, "must be an integer from 0 to 2**64 - 1"), ("seed", -(2**63) - 1, "must be an integer from 0"),
    # torch reads a negative seed modulo 2**64: seed -1 trained the very run of seed 2**64 - 1
    ("seed", -1, f"must be an integer from 0 to 2**64 - 1: torch would read -1 as {2**64 - 1}, the seed of another"),
    ("batch_size", 10**20, "must be <= 2,147,483,647 (a typo?)"),
    ("eval_batch_size", 10**20, "must be <= 2,147,483,647 (a typo?)")])
def test_a_seed_or_batch_torch_cannot_take_is_refused_in_validation(tmp_path, capsys, key, value, message):
    """`train.seed=99999999999999999999` and `train.batch_size=1e20` (an extra digit) validated, then stopped inside
    torch with a traceback (`Overflow when unpacking long long`), the batch one after the run folder was written."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=2, eval_every=0)))
    code, _, err = cli(capsys, "train", str(cfg), f"train.{key}={value}", "--out", str(tmp_path / "run"))
    assert code == 2 and f"train.{key} = {value}: {message}" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    load_config(tiny(seed=2**64 - 1, batch_size=2**31 - 1, eval_batch_size=2**31 - 1))  # the limits themselves
    load_config(tiny(seed=0))


def test_the_largest_seed_trains_and_a_saved_negative_seed_reads_as_the_seed_torch_took(tmp_path, capsys):
    """Seeds are 0 to 2**64 - 1. A run saved when train.seed -1 was accepted (torch seeded it as 2**64 - 1) still
    loads, its seed read as 2**64 - 1, and resumes from a config that gives that seed (its -1 is now refused)."""
    from attention_zoo.checkpoint import load_saved_config

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny(steps=2, eval_every=0, checkpoint_every=1, seed=2**64 - 1)))
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", str(cfg), "--out", str(run), "--no-progress", "--stop-after", "1")
    assert code == 0, err
    for saved in (run / "config.yaml", run / "checkpoint" / "config.yaml"):  # as a run of -1 wrote them
        text = saved.read_text()
        assert f"seed: {2**64 - 1}" in text
        saved.write_text(text.replace(f"seed: {2**64 - 1}", "seed: -1"))
    assert load_saved_config(run / "checkpoint")["train"]["seed"] == 2**64 - 1
    code, _, err = cli(capsys, "train", str(cfg), "--out", str(run), "--no-progress", "--resume")
    assert code == 0, err
