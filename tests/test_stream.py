"""Streaming past the training length: per-position loss and keys held (inference/streaming.py) and the
`stream` command that compares models and pruning policies on the same sequences."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from attention_zoo import build_model
from attention_zoo.checkpoint import save_checkpoint
from attention_zoo.cli import main
from attention_zoo.commands.stream import bucket_means
from attention_zoo.data import Batch
from attention_zoo.inference import Pruner, parse_prune_spec, streaming_loss

TRAIN_LEN, LENGTH, DEPTH = 16, 40, 2


def tiny(variant: str, position: str = "rope", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model({"model": {"dim": 32, "depth": DEPTH, "heads": 2, "max_seq_len": TRAIN_LEN,
                                   "position": position, "attention": {"variant": variant}}})
    with torch.no_grad():  # O(1) selection scores, so pruning by F has something to rank
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "kv_proj.weight")):
                p.mul_(10)
    return model.eval()


def test_unpruned_per_position_loss_is_the_full_forward_loss_at_each_position():
    model = tiny("selective")
    tokens = torch.randint(0, 256, (3, LENGTH + 1), generator=torch.Generator().manual_seed(0))
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    result = streaming_loss(model, [batch], prefill=1, track_positions=True)  # every token on its own
    with torch.no_grad():
        full = F.cross_entropy(model(batch.inputs).transpose(1, 2), batch.targets, reduction="none").mean(0)
    torch.testing.assert_close(torch.tensor(result.position_loss, dtype=torch.float64), full.double(), rtol=1e-5, atol=1e-5)
    assert result.position_keys == [DEPTH * (p + 1) for p in range(LENGTH)]  # nothing pruned: every key held
    assert result.loss == pytest.approx(sum(result.position_loss) / LENGTH, rel=1e-6)


@pytest.mark.parametrize("spec", ["budget:6", "window:6"])
def test_a_pruned_cache_holds_its_budget_past_the_training_length(spec):
    model = tiny("selective")
    tokens = torch.randint(0, 256, (2, LENGTH + 1), generator=torch.Generator().manual_seed(1))
    result = streaming_loss(model, [Batch(tokens[:, :-1], tokens[:, 1:])], Pruner(model, parse_prune_spec(spec)),
                            track_positions=True)
    keys = result.position_keys
    assert keys[:6] == [DEPTH * (p + 1) for p in range(6)]  # the prefill: nothing dropped yet
    assert keys[6:] == [DEPTH * 6] * (LENGTH - 6)  # flat from the budget on
    assert all(math.isfinite(v) for v in result.position_loss)


def test_bucket_means_skip_positions_without_a_score():
    assert bucket_means([1.0, 3.0, float("nan"), 5.0, 7.0], 2) == [2.0, 5.0, 7.0]
    assert math.isnan(bucket_means([float("nan")], 1)[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    for name, variant, position in (("selective", "selective", "rope"), ("vanilla", "vanilla", "rope"),
                                    ("learned", "vanilla", "learned")):
        save_checkpoint(root / name / "checkpoint", tiny(variant, position))
    return root


def test_stream_command_compares_policies_on_the_same_sequences(runs, capsys):
    out = runs / "out"
    argv = ["stream", f"{runs / 'selective'}=budget:6", f"{runs / 'vanilla'}=window:6", str(runs / "vanilla"),
            "--length", str(LENGTH), "--batch-size", "1", "--bucket", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "stream.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["stream.json", "stream.png"]  # no temp files left
    assert (out / "stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    budget, window, full = report["entries"]
    assert [e["policy"] for e in report["entries"]] == ["budget:6", "window:6", "none"]
    assert budget["peak_keys"] == window["peak_keys"] == DEPTH * 6 and full["final_keys"] == DEPTH * LENGTH
    assert len(budget["bucket_loss"]) == LENGTH // 8 and budget["loss_past_train_length"] is not None
    assert "selective budget:6: loss" in printed and "past it" in printed


def test_an_interrupt_while_drawing_leaves_no_earlier_figure_beside_the_new_json(runs, capsys, monkeypatch):
    """stream wrote stream.json, then stream.png: an interrupt between the two left this run's JSON beside the
    figure of an earlier run into the same --out. The old figure now goes first and the figure is drawn last."""
    import attention_zoo.inference.stream_plot as stream_plot

    out = runs / "out_interrupted"
    argv = [f"{runs / 'vanilla'}=window:6", "--length", "24", "--batch-size", "1", "--out", str(out), "--no-progress"]
    assert main(["stream", *argv]) == 0
    assert (out / "stream.png").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stream_plot, "save_figure", interrupted)
    assert main(["stream", *argv, "--length", "32"]) == 130  # another run, Ctrl-C while its figure is drawn
    capsys.readouterr()
    assert json.loads((out / "stream.json").read_text())["length"] == 32  # the new report is whole
    assert sorted(p.name for p in out.iterdir()) == ["stream.json"]  # no figure of the 24-token run, no temp file


@pytest.mark.parametrize("args,message", [
    (["{learned}", "--length", "40"], "past model.max_seq_len (16) of a model with learned positions"),
    (["{vanilla}=budget:4", "--length", "40"], "use window:K for a sliding window"),
    (["{vanilla}=", "--length", "40"], "expected CHECKPOINT or CHECKPOINT=POLICY"),
    (["{vanilla}=budget:x", "--length", "40"], "error: argument '{vanilla}=budget:x': budget"),  # stream has no --prune
    (["{vanilla}=budget:8", "--length", "40"], "error: argument '{vanilla}=budget:8': no layer of this model has"),
    (["{vanilla}", "--length", "0"], "--length 0: must be >= 1"),
    (["{vanilla}", "--length", "40", "--bucket", "0"], "--bucket 0: must be >= 1"),
    (["{vanilla}", "--length", "10000000"], "--length 10000000: split 'test' of dataset 'shakespeare' has"),
])
def test_stream_command_errors(runs, capsys, args, message):
    args = [a.format(learned=runs / "learned", vanilla=runs / "vanilla") for a in args]
    message = message.format(vanilla=runs / "vanilla")
    assert main(["stream", *args, "--out", str(runs / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (runs / "bad").exists()



def test_stream_labels_a_bare_checkpoint_folder_by_its_name(runs, capsys, monkeypatch):
    """A run is labelled by its name, and so is a checkpoint folder given relative to the working directory
    (`imp1`), not by the empty name of its parent `.`."""
    (runs / "imp1").mkdir(exist_ok=True)
    for name in ("config.yaml", "model.safetensors"):
        (runs / "imp1" / name).write_bytes((runs / "vanilla" / "checkpoint" / name).read_bytes())
    monkeypatch.chdir(runs)
    assert main(["stream", "vanilla", "imp1", "--length", "8", "--batch-size", "1", "--out", "out_bare",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("vanilla none: loss ") and "\nimp1 none: loss " in printed
    labels = [e["label"] for e in json.loads((runs / "out_bare" / "stream.json").read_text())["entries"]]
    assert labels == ["vanilla none", "imp1 none"]


def test_two_runs_of_one_name_are_told_apart_and_one_listed_twice_is_refused(runs, capsys, monkeypatch):
    """a/vanilla and b/vanilla were one legend entry for two curves; `vanilla` and `vanilla/checkpoint` (one
    checkpoint, one policy) streamed it twice. The first are labelled by their paths, the second refused."""
    for folder in ("a", "b"):
        (runs / folder / "vanilla").mkdir(parents=True, exist_ok=True)
        save_checkpoint(runs / folder / "vanilla" / "checkpoint", tiny("vanilla", seed=len(folder) + ord(folder)))
    monkeypatch.chdir(runs)
    assert main(["stream", "a/vanilla", "b/vanilla", "selective", "--length", "8", "--batch-size", "1",
                 "--out", "out_same_name", "--no-progress"]) == 0
    capsys.readouterr()
    labels = [e["label"] for e in json.loads((runs / "out_same_name" / "stream.json").read_text())["entries"]]
    assert labels == ["a/vanilla none", "b/vanilla none", "selective none"]
    assert main(["stream", "vanilla", "vanilla/checkpoint", "--length", "8", "--out", "out_twice", "--no-progress"]) == 2
    assert ("'vanilla=none' and 'vanilla/checkpoint=none' stream the same checkpoint with the same policy; list it "
            "once") in capsys.readouterr().err
    assert not (runs / "out_twice").exists()


def nan_checkpoint(folder):
    """A checkpoint with one NaN weight (a run that diverged): every logit downstream of it is NaN."""
    model = tiny("selective")
    with torch.no_grad():
        model.blocks[0].attention.out_proj.weight[0, 0] = float("nan")
    return save_checkpoint(folder / "checkpoint", model)


def test_a_checkpoint_with_nan_weights_is_named_not_streamed(tmp_path, capsys):
    """It crashed with a TypeError traceback (formatting a None loss past nothing); nothing may be written."""
    nan_checkpoint(tmp_path / "nan")
    out = tmp_path / "out"
    assert main(["stream", str(tmp_path / "nan"), "--length", "8", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.safetensors: 1 weight tensor(s) hold NaN or infinite values" in err
    assert "blocks.0.attention.out_proj.weight" in err and not out.exists()


def test_a_loss_that_is_not_a_number_is_refused_not_returned():
    """Logits that are not numbers without a non-finite weight (an overflow) must not give a NaN loss either."""
    from attention_zoo.errors import UserError

    model = tiny("selective")
    with torch.no_grad():
        model.blocks[0].attention.out_proj.weight.fill_(float("nan"))
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="the streamed loss is nan: the model's logits are not all finite numbers"):
        streaming_loss(model, [Batch(tokens[:, :-1], tokens[:, 1:])])


def test_a_task_streams_no_padding_past_its_examples(tmp_path, capsys):
    """variable_assignment's examples come one per sequence, padded: --length 100 streamed 77 padding tokens,
    scoring none yet reporting their keys (200 held at the end for 23-token examples)."""
    torch.manual_seed(0)
    data = {"name": "variable_assignment", "num_assignments": 4, "num_queries": 2, "num_vars": 4}
    model = build_model({"model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 64,
                                   "attention": {"variant": "selective"}}, "data": data})
    save_checkpoint(tmp_path / "va" / "checkpoint", model)
    out = tmp_path / "out"
    assert main(["stream", str(tmp_path / "va"), "--length", "100", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--length 100: dataset 'variable_assignment' has examples of 23 tokens" in err and "--length 23" in err
    assert "Traceback" not in err and not out.exists()
    assert main(["stream", str(tmp_path / "va"), "--length", "23", "--out", str(out), "--no-progress"]) == 0
