"""Budget calibration (search logic and the command) and every shell command in docs/inference.md."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from attention_zoo import build_model
from attention_zoo.checkpoint import save_checkpoint
from attention_zoo.cli import main
from attention_zoo.inference import KeyGroup
from attention_zoo.inference.calibration import SHRINK_FACTORS, Calibrator, Evaluation

ROOT = Path(__file__).resolve().parents[1]



def tiny_model(attention: dict, depth: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model({"model": {"dim": 32, "depth": depth, "heads": 2, "max_seq_len": 32, "attention": attention}})
    with torch.no_grad():  # O(1) selection scores, so pruning has something to work with
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "kv_proj.weight")):
                p.mul_(10)
    return model.eval()


# --------------------------------------------------------------------------- search logic


class FakeCalibrator(Calibrator):
    """The search on a synthetic loss: layer group g costs weight[g] / K_g, no model evaluation."""

    def __init__(self, weights: list[float], context: int, tolerance: float):
        self.weights, self.context, self.tolerance, self.depth = weights, context, tolerance, len(weights)
        self.ranked = [w is not None for w in weights]
        self.groups = [KeyGroup((g,)) for g in range(len(weights))]
        self.base, self.evaluations, self.memo = 1.0, [], {}
        self.target = self.base * (1 + tolerance)
        self.bar, self.after_search = tqdm(disable=True), 0

    def layer_budgets(self, group_budgets):
        return list(group_budgets)

    def budget_eval(self, group_budgets, stage):
        loss = self.base + sum(w / k for w, k in zip(self.weights, group_budgets) if k is not None and k < self.context)
        ev = Evaluation("budget", [k or self.context for k in group_budgets], loss, 0.0, stage=stage)
        self.evaluations.append(ev)
        return ev


def test_uniform_search_finds_the_smallest_feasible_budget():
    cal = FakeCalibrator([0.2, 0.1, None], context=512, tolerance=0.01)
    K = cal.uniform_search()
    assert 0.3 / K <= 0.01 < 0.3 / (K - 1)  # K = 30
    assert len(cal.evaluations) <= 10  # log2(512) + 1


def test_search_moves_memory_to_where_it_matters():
    cal = FakeCalibrator([0.28, 0.01, None], context=512, tolerance=0.01)
    uniform, budgets = cal.search()
    assert uniform == 29  # 0.29 / K <= 0.01
    loss = cal.budget_eval(budgets, "check").loss
    assert loss <= cal.target and budgets[2] is None
    assert budgets[1] <= 8 < uniform < budgets[0]  # the group that barely suffers from pruning gives up the most
    assert cal.total(budgets) < cal.total([uniform, uniform, None])
    for g in (0, 1):  # no group can shrink by the last factor any more
        trial = list(budgets)
        trial[g] = max(2, int(budgets[g] * SHRINK_FACTORS[-1]))
        assert trial[g] == budgets[g] or cal.budget_eval(trial, "check").loss > cal.target


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoint", tiny_model({"variant": "selective"}))
    return run


def test_calibrate_command(run_folder, capsys):
    out = run_folder / "cal"
    argv = ["calibrate", str(run_folder), "--tolerance", "0.02", "--context", "24", "--batches", "1",
            "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "calibration.json").read_text())
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "calibration.png"]  # no temp files left
    best, window = report["calibrated"], report["window_same_memory"]
    assert best["loss"] <= report["target_loss"] == pytest.approx(report["base_loss"] * 1.02)
    assert best["memory_ratio"] == pytest.approx(2 * 24 / sum(best["budgets"]))
    assert window["budgets"] == best["budgets"] and window["policy"].startswith("window:")
    assert all(2 <= k <= 24 for k in best["budgets"])
    assert report["held_out"]["base_loss"] > 0 and report["check_split"] == "test"
    curve = [e for e in report["evaluations"] if e["stage"] == "curve"]
    assert {e["budgets"][0] for e in curve} == {12, 6}  # N/2, N/4 (>= 4), for both policies
    assert f"KV memory {best['memory_ratio']:.1f}x less" in printed and "sliding window, same memory" in printed


def test_an_interrupt_while_drawing_leaves_no_earlier_figure_beside_the_new_json(run_folder, capsys, monkeypatch):
    """calibrate wrote calibration.json, then calibration.png: an interrupt between the two left this run's JSON
    beside an earlier run's figure. The old figure now goes first and the figure is drawn last."""
    import attention_zoo.inference.calibration_plot as calibration_plot

    out = run_folder / "cal_interrupted"
    argv = ["calibrate", str(run_folder), "--context", "16", "--batches", "1", "--batch-size", "1", "--no-curve",
            "--threshold", "0", "--check-split", "none", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert (out / "calibration.png").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration_plot, "save_figure", interrupted)
    assert main([*argv, "--tolerance", "0.5"]) == 130  # another run, Ctrl-C while its figure is drawn
    capsys.readouterr()
    assert json.loads((out / "calibration.json").read_text())["tolerance"] == 0.5  # the new report is whole
    # no figure of the first run, no temp file; the journal stays until the figure is drawn (a re-run resumes)
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "calibration.partial.jsonl"]


def test_calibrating_on_test_checks_on_val_by_default(run_folder, capsys):
    """--check-split defaults to test, which is not held out when --split is test: then it is val."""
    out = run_folder / "cal-test"
    argv = ["calibrate", str(run_folder), "--split", "test", "--context", "8", "--batches", "1", "--batch-size", "1",
            "--no-curve", "--threshold", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["split"] == "test" and report["check_split"] == "val"
    assert "held out (val)" in capsys.readouterr().out


def test_memory_is_measured_by_the_most_keys_held_for_every_policy(run_folder, capsys):
    """A threshold's memory was the keys it held on average over the stream, a budget's its K: streaming from one
    token averages (N + 1) / 2 even unpruned, so a threshold that pruned nothing read 2x less memory. Every
    policy is now measured by the most keys a layer held (a budget's K); the mean is reported beside it."""
    out = run_folder / "measure"
    assert main(["calibrate", str(run_folder), "--context", "24", "--batches", "1", "--batch-size", "2", "--out",
                 str(out), "--no-progress", "--measure", "threshold:1e30", "budget:6", "window:6"]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "measure-val.json").read_text())["policies"]}
    nothing_pruned = rows["threshold:1e30"]
    assert nothing_pruned["peak_kept"] == [24, 24] and nothing_pruned["memory_ratio"] == 1.0
    assert nothing_pruned["mean_kept"] == [12.5, 12.5]  # 1, 2, ..., 24 keys after each step
    assert rows["budget:6"]["peak_kept"] == [6, 6] and rows["budget:6"]["memory_ratio"] == 4.0
    assert rows["window:6"]["memory_ratio"] == 4.0
    assert "threshold:1e30: loss" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--tolerance", "0"], "relative tolerance in (0, 1)"),
    (["--context", "3"], "--context 3: must be >= 4"),
    (["--context", "0"], "--context 0: must be >= 4"),  # not read as "unset" (the model's max_seq_len)
    (["--context", "16", "--measure", "budget:x"], "--measure 'budget:x': budget"),  # calibrate has no --prune
    (["--context", "16", "--measure", "budget:4,4,4"], "--measure 'budget:4,4,4': 3 budgets for 2 layers"),
    (["--batches", "0"], "--batches 0: must be >= 1"),
    (["--context", "16", "--measure", "budget:4", "--tolerance", "5"], "--tolerance 5.0: expected a relative tolerance"),
    # the "held out" check re-measured the calibration's own sequences and reported them as held out
    (["--split", "val", "--check-split", "val"], "--check-split val: the same split as --split"),
    # rope runs past max_seq_len, so only the data bounds the context: the dataset's ValueError was a traceback
    (["--context", "10000000"], "--context 10000000 (--split val): split 'val' of dataset"),
    (["--context", "10000000", "--measure", "budget:4"], "--context 10000000 (--split val): split 'val' of dataset"),
])
def test_calibrate_command_errors(run_folder, capsys, args, message):
    assert main(["calibrate", str(run_folder), "--no-progress", "--out", str(run_folder / "bad"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run_folder / "bad").exists()


def test_calibrate_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    """It crashed in matplotlib ("Axis limits cannot be NaN or Inf") after writing a calibration.json of NaNs."""
    model = tiny_model({"variant": "selective"})
    with torch.no_grad():
        model.blocks[0].attention.out_proj.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "run" / "checkpoint", model)
    out = tmp_path / "cal"
    assert main(["calibrate", str(tmp_path / "run"), "--context", "8", "--batches", "1", "--batch-size", "1",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.safetensors: 1 weight tensor(s) hold NaN or infinite values" in err
    assert not out.exists()


def test_a_task_is_calibrated_at_its_example_length(tmp_path, capsys):
    """variable_assignment's examples are one per sequence, padded to the context: --context 40 (or the default,
    model.max_seq_len) streamed padding past them and counted it in the KV-memory ratio (10.0x where the same
    losses at the example length gave 5.8x). The default is the example length; another context is refused."""
    torch.manual_seed(0)
    data = {"name": "variable_assignment", "num_assignments": 4, "num_queries": 2, "num_vars": 4}
    model = build_model({"model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 64,
                                   "attention": {"variant": "selective"}}, "data": data})
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint", model)
    base = ["calibrate", str(run), "--batches", "1", "--batch-size", "2", "--no-progress", "--measure", "budget:4"]
    assert main([*base, "--context", "40", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--context 40: dataset 'variable_assignment' has examples of 23 tokens" in err and "give --context 23" in err
    assert not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "measure-val.json").read_text())["context"] == 23


@pytest.mark.parametrize("attention,named", [
    ({"variant": "vanilla"}, "Vanilla"),
    # accumulate without sources attends like vanilla in every layer: calibrate's own message, not its probe's
    ({"variant": "cross_layer_selective", "mode": "accumulate", "sources": []},
     "CrossLayerSelective; layers 0, 1 (CrossLayerSelective) have none: below their first source layer (their "
     "`sources` lists none at or below them)"),
])
def test_calibrate_refuses_a_model_without_selection(tmp_path, capsys, attention, named):
    save_checkpoint(tmp_path / "checkpoint", tiny_model(attention))
    assert main(["calibrate", str(tmp_path), "--no-progress", "--context", "8"]) == 2
    err = capsys.readouterr().err
    assert (f"no layer of this model has a selection penalty F (no selective attention; attention: {named}"
            "), so there are no budgets to calibrate" in err)
    assert "--measure window:4" in err and "budget:" not in err  # no policy the user never typed


# --------------------------------------------------------------------------- docs/inference.md


DOCS = [ROOT / "docs" / "inference.md", ROOT / "docs" / "pruning-results.md"]
RUN = "runs/pruning/selective_memory"
TINY = {  # appended to each documented command: argparse and config overrides take the last value
    "train": ["model.dim=16", "model.depth=4", "model.heads=2", "model.max_seq_len=32", "train.seq_len=32",
              "train.steps=2", "train.batch_size=2", "train.warmup=1", "train.eval_every=0", "train.eval_batches=1",
              "--no-progress"],
    "generate": ["--max-tokens", "12"],
    "calibrate": ["--context", "16", "--batches", "1", "--batch-size", "1", "--no-progress"],
    "stream": ["--length", "48", "--batch-size", "1", "--bucket", "8", "--no-progress"],  # past max_seq_len 32
}


def documented_commands(doc: Path) -> list[list[str]]:
    """argv of each attention-zoo command in the page's bash blocks (continuations joined, VAR=x prefixes dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)
            if words[:1] == ["attention-zoo"]:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_documented_command_runs(doc, tmp_path, monkeypatch, capsys):
    commands = documented_commands(doc)
    assert {"train", "calibrate"} <= {argv[0] for argv in commands}  # the run the other commands use is trained first
    monkeypatch.chdir(tmp_path)  # the run folder and calibration output land here
    for argv in sorted(commands, key=lambda a: a[0] != "train"):
        argv = [str(ROOT / w) if w.endswith(".yaml") else w for w in argv]
        assert main([*argv, *TINY[argv[0]]]) == 0, " ".join(argv)
        printed = capsys.readouterr().out
        if argv[0] == "generate":
            assert "tokens/s" in printed and "kept keys per layer" in printed
        if "--measure" in argv:
            assert all(spec in printed for spec in argv[argv.index("--measure") + 1:] if not spec.startswith("-"))
    assert (tmp_path / RUN / "calibration" / "calibration.json").is_file()
    if doc.name != "inference.md":
        return
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("200,", "5,"), str(doc), "exec"), namespace)
    assert namespace["result"].cache.lengths() == [10] * 4  # a prompt of 6 and 4 of the 5 new tokens fed back


def test_calibrate_progress_bar_counts_against_a_total_and_labels_the_reference(run_folder, capsys):
    """The bar has a total from the first stage on (an estimate, refined per stage) and ends at the evaluations
    made; before any evaluation it says it is computing the unpruned reference, not just `0eval`."""
    out = run_folder / "cal_progress"
    argv = ["calibrate", str(run_folder), "--tolerance", "0.02", "--context", "8", "--batches", "1",
            "--batch-size", "1", "--no-curve", "--check-split", "none", "--threshold", "0", "--out", str(out)]
    assert main(argv) == 0
    frames = [f for f in capsys.readouterr().err.replace("\r", "\n").splitlines() if f.startswith("calibrate")]
    assert "stage=unpruned reference" in frames[0]
    counts = [tuple(map(int, m.groups())) for f in frames if (m := re.search(r" (\d+)/(\d+) \[", f))]
    assert counts and all(total > 0 for _, total in counts)  # no bare "38eval": a total on every frame
    done, total = counts[-1]
    assert done == total == len(json.loads((out / "calibration.json").read_text())["evaluations"])


def test_an_interrupted_calibration_resumes_where_it_stopped(run_folder, capsys, monkeypatch):
    """A calibration is dozens of streaming evaluations; Ctrl-C (or a lost machine) lost them all. Each is now
    journaled as it finishes: the re-run streams only what is left, and reports what an uninterrupted run does."""
    import attention_zoo.inference.calibration as calibration

    def argv(out):
        return ["calibrate", str(run_folder), "--context", "16", "--batches", "1", "--batch-size", "2",
                "--out", str(out), "--no-progress"]

    real, calls = calibration.streaming_loss, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "streaming_loss", counted)
    interrupt_at = 0
    assert main(argv(run_folder / "cal_whole")) == 0
    whole, evaluations = json.loads((run_folder / "cal_whole" / "calibration.json").read_text()), len(calls)
    assert not (run_folder / "cal_whole" / "calibration.partial.jsonl").exists()  # finished: nothing to resume

    out = run_folder / "cal_resumed"
    calls.clear()
    interrupt_at = 7
    assert main(argv(out)) == 130
    assert not (out / "calibration.json").exists()
    journal = (out / "calibration.partial.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 6 and "fingerprint" in journal[0]  # the 6 evaluations that finished
    calls.clear()
    interrupt_at = 0
    assert main(argv(out)) == 0
    assert "6 evaluation(s) read back" in capsys.readouterr().out
    assert len(calls) == evaluations - 6
    resumed = json.loads((out / "calibration.json").read_text())
    assert {**resumed, "checkpoint": None} == {**whole, "checkpoint": None}
    assert not (out / "calibration.partial.jsonl").exists()


def test_a_journal_of_another_model_or_sequences_is_not_read_back(run_folder, tmp_path, capsys):
    """The journal's fingerprint covers the weights and the token ids: another checkpoint (or split) in the same
    --out starts afresh, and says so."""
    from attention_zoo.inference.journal import Journal, fingerprint
    from attention_zoo.inference.streaming import StreamingResult

    model = tiny_model({"variant": "selective"})
    other = tiny_model({"variant": "selective"}, seed=1)
    batches = [type("Batch", (), {"inputs": torch.arange(8)[None], "targets": torch.arange(1, 9)[None]})()]
    fixed = fingerprint(model, batches, context=8)
    assert fixed == fingerprint(model, batches, context=8)
    assert fixed != fingerprint(other, batches, context=8)
    assert fixed != fingerprint(model, batches * 2, context=8)
    said = []
    journal = Journal(tmp_path / "j.jsonl", fixed, say=said.append)
    assert journal.get("search unpruned", lambda: StreamingResult(1.5, 8, [1.0], [2])).loss == 1.5
    with (tmp_path / "j.jsonl").open("a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write
    again = Journal(tmp_path / "j.jsonl", fixed, say=said.append)
    assert again.get("search unpruned", lambda: pytest.fail("measured again")).loss == 1.5
    assert said == ["resuming from " + str(tmp_path / "j.jsonl") + ": 1 evaluation(s) read back"]
    afresh = Journal(tmp_path / "j.jsonl", fingerprint(other, batches, context=8), say=said.append)
    assert "another model or other sequences; starting afresh" in said[-1]
    assert afresh.get("search unpruned", lambda: StreamingResult(2.5, 8, [1.0], [2])).loss == 2.5
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["fingerprint"]["weights"] != fixed["weights"]
    afresh.close()
    assert not (tmp_path / "j.jsonl").exists()


def test_an_interrupted_measure_resumes_from_its_journal(run_folder, capsys, monkeypatch):
    """`calibrate --measure` journals each policy as `calibrate` does: a re-run measures only those left."""
    import attention_zoo.inference as inference

    out = run_folder / "measure_resumed"
    argv = ["calibrate", str(run_folder), "--context", "16", "--batches", "1", "--batch-size", "1", "--out", str(out),
            "--measure", "budget:4", "window:4", "budget:8", "--no-progress"]
    real, calls = inference.streaming_loss, []

    def interrupted_at_the_third(*args, **kwargs):  # unpruned, budget:4, then Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "streaming_loss", interrupted_at_the_third)
    assert main(argv) == 130
    calls.clear()
    monkeypatch.setattr(inference, "streaming_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(argv) == 0
    assert len(calls) == 2 and "2 evaluation(s) read back" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["measure-val.json"]


def test_the_figure_says_which_points_lie_above_it(tmp_path, monkeypatch):
    """The window at the calibrated memory (+7.4% on the pruning page) lay above the chart's top: its legend entry
    marked nothing visible. Its entry now gives its loss change and says it is above the chart, as the threshold's
    does; one within the chart is drawn."""
    import attention_zoo.inference.calibration_plot as calibration_plot

    figures = []
    monkeypatch.setattr(calibration_plot, "save_figure", lambda fig, path, dpi: figures.append(fig) or Path(path))

    def report(window_loss):
        point = lambda policy, loss, ratio, stage: {"policy": policy, "loss": loss, "memory_ratio": ratio,  # noqa: E731
                                                     "stage": stage, "relative_increase": loss - 1}
        return {"base_loss": 1.0, "target_loss": 1.01, "tolerance": 0.01, "context": 64, "threshold": None,
                "calibrated": point("budget:4,4", 1.009, 16.0, "calibrated"),
                "window_same_memory": point("window:4,4", window_loss, 16.0, "window"),
                "evaluations": [point("budget:8,8", 1.002, 8.0, "curve"), point("window:8", 1.004, 8.0, "curve")]}

    for window_loss, drawn in ((1.074, False), (1.03, True)):
        calibration_plot.plot_calibration(report(window_loss), tmp_path / "c.png")
        legend = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
        entry = next(t for t in legend if t.startswith("window at the same memory"))
        assert entry == f"window at the same memory, {window_loss - 1:+.1%}" + ("" if drawn else " (above the chart)")
        red = [c for c in figures[-1].axes[0].collections if c.get_label() == entry]
        assert len(red[0].get_offsets()) == int(drawn)
