"""`attention-zoo list`, `validate` and `describe`, run in-process through cli.main (the subprocess
route, exit codes and tracebacks included, is covered in test_config.py and test_plugins.py)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from attention_zoo import backends
from attention_zoo.backends import BACKENDS, Backend
from attention_zoo.cli import main
from attention_zoo.variant_registry import get_variant, list_variants, summary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_parser_is_built_without_importing_torch():
    """`attention-zoo --help` and a mistyped flag answer in a fraction of a second, and a Ctrl-C during torch's
    import reaches the CLI's handler: neither the package nor any command module imports torch at its top."""
    code = ("import sys; from attention_zoo.cli import build_parser; build_parser(); import attention_zoo; "
            "heavy = sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules); "
            "assert not heavy, heavy; attention_zoo.ProjectedAttention; assert 'torch' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_list_shows_every_variant_with_description_and_parameters(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in list_variants():
        assert f"{name}: {summary(name)}" in out and summary(name)
        for key, p in get_variant(name).params.items():
            assert re.search(rf"^    {key} \({re.escape(p.type_name())}, [^)]*\): {re.escape(p.doc)}$", out, re.M), key
    assert "kv_heads (int, required): key/value heads" in out  # gqa
    assert "mode (str, default 'share', one of share, accumulate)" in out


def test_list_with_a_wildcard(capsys):
    code, out, _ = run(capsys, "list", "*selective")
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == ["cross_layer_selective", "selective"]
    code, out, _ = run(capsys, "list", "nothing*")
    assert code == 1 and "no variant matches 'nothing*'" in out and "selective" in out


def test_validate(capsys, tmp_path):
    good = [str(p) for p in sorted(CONFIGS.glob("*.yaml"))]
    code, out, _ = run(capsys, "validate", *good)
    assert code == 0 and out.splitlines() == [f"{p}: ok" for p in good]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 2\n  heads: 8\n  attention: {variant: gqa, kv_heads: 8}\n  layers: [{at: [5]}]\n")
    code, out, _ = run(capsys, "validate", good[0], str(bad))
    assert code == 2
    assert f"{good[0]}: ok" in out
    assert f"{bad}: model.layers[0].at = [5]: layer indices [5] outside [0, 1]" in out
    # KEY.PATH=VALUE items are overrides applied to every file, as `train` and `describe` take them
    code, out, _ = run(capsys, "validate", good[0], good[1], "model.depth=0")
    assert code == 2 and out.count("model.depth = 0: must be >= 1") == 2 and "file not found" not in out
    code, _, err = run(capsys, "validate", "model.depth=3")
    assert code == 2 and "no config file given, only overrides: model.depth=3" in err


def test_validate_checks_a_training_config_as_train_does(capsys, tmp_path):
    """A config with a train or data section also gets the checks that need model, data and train together
    (train would refuse it); a model-only config is not checked against a data set it never trains on."""
    long = tmp_path / "long.yaml"
    long.write_text("model: {dim: 64, heads: 4, depth: 2, max_seq_len: 128}\ntrain: {seq_len: 256}\n")
    code, out, _ = run(capsys, "validate", str(long))
    assert code == 2 and f"{long}: train.seq_len = 256: longer than model.max_seq_len (128)" in out
    small_vocab = tmp_path / "model_only.yaml"
    small_vocab.write_text("model: {dim: 64, heads: 4, depth: 2, vocab_size: 100}\n")
    code, out, _ = run(capsys, "validate", str(small_vocab))
    assert code == 0 and out.strip() == f"{small_vocab}: ok"
    small_vocab.write_text("model: {dim: 64, heads: 4, depth: 2, vocab_size: 100}\ndata: {name: shakespeare}\n")
    code, out, _ = run(capsys, "validate", str(small_vocab))
    assert code == 2 and "model.vocab_size = 100: dataset 'shakespeare' has 256 tokens" in out


def test_validate_checks_a_sweep_file_as_ablate_reads_it(capsys, tmp_path):
    """A sweep file (a key only sweeps have: grid, runs, seeds...) is checked as `ablate` reads it, every run and
    one dry run per model, beside configs; it used to be read as a config ('base: expected a path')."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {model: {dim: 32, depth: 2, heads: 2, max_seq_len: 32}, train: {seq_len: 16}}\n"
                     "grid: {model.attention.variant: [vanilla, selectve]}\nseeds: [0, 1]\n")
    config = str(CONFIGS / "selective.yaml")
    code, out, _ = run(capsys, "validate", str(sweep), config)
    assert code == 2 and f"{config}: ok" in out
    assert f"{sweep} (runs: variant=selectve): model.attention.variant = 'selectve': unknown variant" in out
    assert "expected a path" not in out
    sweep.write_text(sweep.read_text().replace("selectve", "selective"))
    code, out, _ = run(capsys, "validate", str(sweep), "model.depth=3")  # overrides reach every run
    assert code == 0 and out.splitlines() == [f"{sweep}: ok (a sweep file: 4 runs)"]
    code, out, _ = run(capsys, "validate", str(sweep), "model.depth=0")
    assert code == 2 and f"{sweep} (every run): model.depth = 0: must be >= 1" in out


def describe(capsys, *argv):
    code, out, err = run(capsys, "describe", *argv)
    assert code == 0, err
    layers = re.split(r"^(?=layer \d+: )", out, flags=re.M)
    return layers[0], layers[1:]


def test_describe_shows_layers_state_backend_and_parameter_count(capsys):
    from attention_zoo import build_model

    header, layers = describe(capsys, str(CONFIGS / "selective_hybrid.yaml"))
    count = build_model(CONFIGS / "selective_hybrid.yaml").num_parameters()
    assert f"parameters: {count:,}" in header and "depth 4, dim 256, heads 8 x 32" in header
    assert len(layers) == 4
    assert layers[0].startswith("layer 0: selective {'kv_heads': None, 'qk_norm': False, 'qkv_bias': False, "
                                "'out_bias': False, 'selection_head': 0, 'protect_bos': True, 'residual': False}")
    assert "state read: -; written: selection_penalty" in layers[0]
    assert "residual': True" in layers[1]
    assert "(optional: residual_scores); written: residual_scores, selection_penalty" in layers[1]
    assert layers[3].startswith("layer 3: vanilla {'kv_heads': None, 'qk_norm': False")
    assert "state read: -; written: -" in layers[3]
    for layer in layers:
        assert re.search(r"^    backend \(auto, cpu, float32.*\): (sdpa|math|xformers)", layer, re.M), layer


def test_describe_parameter_count_follows_the_shapes(capsys):
    """Default stack (rope, rmsnorm, swiglu): embeddings (tied head) + per layer q, k/v, out, SwiGLU's three
    matrices of hidden 8 * ceil(2/3 * 4 * d / 8), two RMSNorm gains + the final gain; rope has no weights.
    GPT-2's stack adds the learned position table, LayerNorm biases and GELU's two matrices of 4 * d."""
    V, d, n, L, kv = 256, 256, 1024, 4, 2 * 32
    hidden = 8 * -(-2 * 4 * d // (3 * 8))
    per_layer = d * d + 2 * kv * d + d * d + 3 * hidden * d + 2 * d
    header, _ = describe(capsys, str(CONFIGS / "gqa.yaml"))
    assert "stack: position rope, norm rmsnorm, mlp swiglu" in header
    assert f"parameters: {V * d + L * per_layer + d:,}" in header
    header, _ = describe(capsys, str(CONFIGS / "gqa.yaml"), "model.position=learned", "model.norm=layernorm", "model.mlp=gelu")
    per_layer = d * d + 2 * kv * d + d * d + 2 * 4 * d * d + 4 * d
    assert f"parameters: {V * d + n * d + L * per_layer + 2 * d:,}" in header


def test_describe_share_mode_state_flow(capsys):
    _, layers = describe(capsys, str(CONFIGS / "cross_layer_share.yaml"))
    assert "state read: -; written: selection_penalty" in layers[0]
    for layer in layers[1:]:
        assert "state read: selection_penalty; written: -" in layer


def test_describe_with_overrides(capsys):
    header, layers = describe(capsys, str(CONFIGS / "selective.yaml"), "model.depth=2", "model.attention.kv_heads=4")
    assert "depth 2" in header and len(layers) == 2 and "'kv_heads': 4" in layers[0]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", ["triton", "xformers", "flex"])
def test_describe_plans_a_named_gpu_backend_from_a_cpu_machine(capsys, backend, device):
    """The dry run on the meta device never asks the named backend to run (it would refuse meta, and
    describe died with a traceback): the plan is made for --device, where the backend runs or is
    refused with its reason."""
    _, layers = describe(capsys, str(CONFIGS / "selective.yaml"), "--train", "--device", device, f"backend={backend}")
    assert len(layers) == 4
    for layer in layers:
        assert re.search(rf"^    backend \({backend}, {device}, float32, train; bias with grad\): "
                         rf"({backend}|none: backend '{backend}' refused: .+)$", layer, re.M), layer
    if backend == "flex":  # no FlexAttention backward on CPU; on a CUDA machine it would run
        assert all(("refused: torch has no FlexAttention backward on CPU" in layer) == (device == "cpu")
                   for layer in layers)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_describe_says_where_residual_scores_go_dense_on_the_device_planned_for(capsys, device):
    """RealFormer's R is attention on q and k concatenated over layers, (l + 1) D wide at layer l, until that
    passes the backend's head-dim limit: none on CPU, 256 for SDPA's flash kernels on CUDA. The meta-device plan
    takes that decision for --device (it took the meta device's, a CUDA limit, for a CPU plan) and says where
    R becomes a (B, H, N, N) tensor and why."""
    D = 32  # 8 layers of dim 128, 4 heads: layer l is (l + 1) * 32 wide, 288 > 256 at layer 8
    _, layers = describe(capsys, str(CONFIGS / "residual.yaml"), "--device", device, "model.depth=10",
                         "model.dim=128", "model.heads=4")
    dense = [i for i, layer in enumerate(layers) if "residual scores R carried as a dense" in layer]
    if device == "cpu":
        assert dense == []
    else:
        assert dense == [8, 9] and (8 + 1) * D > 256 >= (7 + 1) * D
        assert f"the concatenated head dim {(8 + 1) * D} is above the backend's limit 256" in layers[8]
        assert "an earlier layer carried R dense" in layers[9]


@pytest.mark.parametrize("config,argv", [("selective.yaml", ["--train", "--dtype", "bfloat16"]),
                                         ("residual.yaml", ["model.depth=10", "model.dim=128", "model.heads=4"])])
def test_describe_plans_cuda_n_as_cuda(capsys, config, argv):
    """A run's calls carry the device's type ("cuda"): a plan for --device cuda:1 passed "cuda:1", and Triton and
    xformers were refused on every layer as not on CUDA ("tensors are on cuda:1"), unlike the run it plans."""
    _, on_cuda = describe(capsys, str(CONFIGS / config), "--device", "cuda", *argv)
    _, on_cuda_1 = describe(capsys, str(CONFIGS / config), "--device", "cuda:1", *argv)
    assert [layer.replace("cuda:1,", "cuda,") for layer in on_cuda_1] == on_cuda
    assert "tensors are on cuda:1" not in "".join(on_cuda_1)


def test_describe_a_bad_config_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {attention: {variant: vanila}}\n")
    code, out, err = run(capsys, "describe", str(bad))
    assert code == 2 and "did you mean 'vanilla'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["validate"], ["describe"], ["frobnicate"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_a_named_backend_that_refuses_training_exits_2_with_the_reason(capsys, tmp_path):
    """No traceback: the refusal, and the backends that would run the call instead."""
    code, _, err = run(capsys, "train", str(CONFIGS / "train" / "shakespeare_tiny.yaml"), "backend=flex",
                       "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err
    assert ("attention-zoo train: error: backend 'flex' refused: torch has no FlexAttention backward on CPU "
            "(train there with sdpa or math); backend: auto, or one that accepts this call: ") in err
    assert "sdpa, math" in err


def test_a_reader_that_goes_away_gets_no_traceback():
    """`attention-zoo ... | head`: when the reader closes the pipe, the command stops quietly (exit 141, as a shell
    tool killed by SIGPIPE reports) instead of printing a BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "attention_zoo", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes anything
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# Every command that writes: its output flag and the rest of a command line that reaches the check (the check
# comes before any checkpoint, model or data is read, so the other arguments need not exist).
WRITERS = {
    "train": (["train", str(CONFIGS / "vanilla.yaml")], "--out", "folder"),
    "ablate": (["ablate", str(CONFIGS / "ablations" / "quickstart.yaml")], "--out", "folder"),
    "bench": (["bench", "--variants", "vanilla", "--seq-lens", "16"], "--out", "folder"),
    "eval": (["eval", "no-such-checkpoint"], "--json", "file"),
    "calibrate": (["calibrate", "no-such-checkpoint"], "--out", "folder"),
    "export-hf": (["export-hf", "no-such-checkpoint"], "--out", "folder"),
    "import-hf": (["import-hf", "no-such-model"], "--out", "folder"),
    "stream": (["stream", "no-such-checkpoint", "--length", "64"], "--out", "folder"),
}


def test_every_writing_command_is_listed():
    """A new command with --out/--json must join WRITERS (and check its path before any work)."""
    writes = {name for name, text in _command_sources().items() if '"--out"' in text or '"--json"' in text}
    assert writes == set(WRITERS)


def _command_sources() -> dict[str, str]:
    import attention_zoo.commands as commands

    folder = Path(commands.__file__).parent
    return {p.stem.replace("_", "-"): p.read_text() for p in folder.glob("*.py") if p.stem != "__init__"}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_output_path_below_a_file_is_refused_before_any_work(capsys, tmp_path, command):
    argv, flag, kind = WRITERS[command]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    target = blocker / ("out.json" if kind == "file" else "out")
    code, _, err = run(capsys, *argv, flag, str(target))
    assert code == 2, err
    assert f"error: {flag} {target}: {blocker} is a file" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written beside it


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_output_of_the_other_kind_is_refused(capsys, tmp_path, command):
    """A folder where a file is written (eval --json) or a file where a folder is (every --out)."""
    argv, flag, kind = WRITERS[command]
    target = tmp_path / "taken"
    target.write_text("keep me\n") if kind == "folder" else target.mkdir()
    code, _, err = run(capsys, *argv, flag, str(target))
    other = "a file" if kind == "folder" else "a folder"
    assert code == 2 and f"error: {flag} {target}: is {other}; give the path of a {kind} to write" in err, err
    assert target.is_dir() == (kind == "file")  # left as it was


def test_an_output_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    """Through os.access, as the check asks it (root may write anywhere, so the denial is simulated)."""
    import os

    from attention_zoo.errors import UserError
    from attention_zoo.paths import check_output_path

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UserError, match=rf"--out {tmp_path}/new/run: cannot write into {tmp_path} \(permission denied\)"):
        check_output_path("--out", tmp_path / "new" / "run", "folder")  # the nearest existing parent is asked
    with pytest.raises(UserError, match="permission denied"):
        check_output_path("--json", tmp_path / "x.json", "file")
    (tmp_path / "open").mkdir()
    assert check_output_path("--json", tmp_path / "open" / "x.json", "file") == tmp_path / "open" / "x.json"


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_output_folder_that_refuses_writes_despite_its_permissions_is_refused_before_any_work(
        capsys, tmp_path, monkeypatch, command):
    """Root passes os.access everywhere, yet a write into an NFS share that squashes root, /proc or /sys fails:
    eval --json /sys/x.json and stream/calibrate --out /proc/x did all their work, then died at the write naming a
    temporary file. A probe file is tried first (simulated here: root may write into tmp_path)."""
    import errno

    import attention_zoo.paths as paths

    class NoWrites:
        @staticmethod
        def mkstemp(dir, prefix):
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / prefix))

    monkeypatch.setattr(paths, "tempfile", NoWrites)
    argv, flag, kind = WRITERS[command]
    target = tmp_path / ("out.json" if kind == "file" else "out")
    code, out, err = run(capsys, *argv, flag, str(target))
    assert code == 2 and out == "", err
    assert f"error: {flag} {target}: cannot write into {tmp_path} (Permission denied)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    from attention_zoo.paths import check_output_path

    assert check_output_path("--out", tmp_path / "new", "folder") == tmp_path / "new"
    assert check_output_path("--json", tmp_path / "x.json", "file") == tmp_path / "x.json"
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_naming_a_file_is_one_line_not_a_traceback(capsys, monkeypatch, tmp_path):
    """The last guard: a file error no command checked first (a disk that fills, a permission changed
    mid-run) names the file and exits 2; -v shows the traceback instead."""
    from attention_zoo.commands import inspect_config

    def fails(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "results.json"))

    monkeypatch.setattr(inspect_config, "cmd_list", fails)  # the parser is built per call and binds it then
    code, _, err = run(capsys, "list")
    assert code == 2
    assert err == f"attention-zoo list: error: {tmp_path / 'results.json'}: Permission denied (rerun with -v for the traceback)\n"
    with pytest.raises(PermissionError):
        main(["-v", "list"])


# --- --device words, describe of run folders, backend reasons said once (appended with the inference fixes) ---


@pytest.fixture
def tiny_run(tmp_path):
    """A run folder (config.yaml beside checkpoint/) of a 2-layer selective model."""
    import shutil

    import torch

    from attention_zoo import build_model
    from attention_zoo.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model({"model": {"dim": 16, "depth": 2, "heads": 2, "max_seq_len": 16,
                                   "attention": {"variant": "selective"}}})
    save_checkpoint(tmp_path / "run" / "checkpoint", model)
    shutil.copy(tmp_path / "run" / "checkpoint" / "config.yaml", tmp_path / "run" / "config.yaml")
    return tmp_path / "run"


RUN_COMMANDS = {  # each command's arguments besides the checkpoint and --device, kept tiny
    "generate": ["--prompt", "hi", "--max-tokens", "1"],
    "eval": ["--batches", "1", "--batch-size", "1", "--seq-len", "8"],
    "calibrate": ["--context", "8", "--batches", "1", "--batch-size", "1", "--no-progress"],
    "stream": ["--length", "8", "--batch-size", "1", "--no-progress"],
    "describe": [],
}


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_every_command_checks_the_device_words_alike(tiny_run, tmp_path, capsys, command):
    """One check (inference.checkpoints.check_device): an unknown device is refused with one message naming
    the flag, the value and the valid words; mps is refused by name where this machine has none."""
    import torch

    extra = [*RUN_COMMANDS[command], *(["--out", str(tmp_path / "out")] if command == "stream" else [])]
    code, out, err = run(capsys, command, str(tiny_run), *extra, "--device", "tpu")
    assert code == 2 and "--device 'tpu': expected auto, cpu, cuda or cuda:N (or mps" in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    if command == "describe":  # plans a backend for a device, which need not be this machine's
        for device in ("mps", "cuda:1", "auto"):
            assert run(capsys, command, str(tiny_run), "--device", device)[0] == 0
        return
    if not torch.backends.mps.is_available():
        code, _, err = run(capsys, command, str(tiny_run), *extra, "--device", "mps")
        assert code == 2 and "--device mps: MPS (Apple GPU) is not available on this machine" in err, err
    code, _, err = run(capsys, command, str(tiny_run), *extra, "--device", "auto")
    assert code == 0, err


def test_describe_and_validate_take_a_run_or_checkpoint_folder(tiny_run, tmp_path, capsys):
    """As train does: the folder's config.yaml (a run folder's, else its checkpoint/'s)."""
    for folder in (tiny_run, tiny_run / "checkpoint"):
        header, layers = describe(capsys, str(folder))
        assert "depth 2, dim 16" in header and len(layers) == 2
    (tiny_run / "config.yaml").unlink()  # a run folder with only checkpoint/config.yaml
    assert "depth 2, dim 16" in describe(capsys, str(tiny_run))[0]
    code, out, _ = run(capsys, "validate", str(tiny_run / "checkpoint"), str(tmp_path))
    assert code == 2 and f"{tiny_run / 'checkpoint'}: ok" in out
    assert f"{tmp_path}: a folder without config.yaml; give a config file, a run folder or a checkpoint folder" in out
    code, _, err = run(capsys, "describe", str(tmp_path))
    assert code == 2 and "a folder without config.yaml" in err and "Is a directory" not in err


def test_describe_says_a_skip_reason_shared_by_every_layer_once(capsys, monkeypatch):
    class Picky(Backend):
        name = "picky"

        def refuse(self, call):
            return f"needs head_dim 128, got {call.head_dim}"

    monkeypatch.setitem(BACKENDS._entries, "picky", Picky())
    monkeypatch.setattr(backends, "AUTO_ORDER", ("picky", "math"))
    _, layers = describe(capsys, str(CONFIGS / "vanilla.yaml"), "model.depth=3")
    out = "".join(layers)
    assert len(layers) == 3 and all(re.search(r"\): math$", layer, re.M) for layer in layers)
    assert out.count("needs head_dim 128") == 1 and "skipped on every layer: picky: needs head_dim 128, got 32" in out


def test_sigterm_stops_a_run_as_an_interrupt_leaving_no_temporary_folder(tmp_path):
    """`timeout`, a scheduler or torchrun end a run with SIGTERM, which killed Python outright: the checkpoint
    being saved stayed behind as a .checkpoint.*.tmp folder and nothing was said. Now it stops as Ctrl-C
    does (exit 143, one line), atomic writes cleaned up, and the run resumes."""
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {dim: 32, depth: 2, heads: 2, max_seq_len: 32}\ndata: {name: shakespeare}\n"
                      "train: {steps: 100000, batch_size: 2, seq_len: 32, eval_every: 0, checkpoint_every: 1, "
                      "device: cpu}\n")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "attention_zoo", "train", str(config), "--out", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint" / "state.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # saving every step: the signal lands in a save or between two
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().endswith("attention-zoo train: terminated") and "Traceback" not in err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert (run / "checkpoint" / "state.pt").is_file()


def test_a_json_result_writes_through_a_link_and_refuses_a_device_or_an_empty_path(tmp_path, monkeypatch):
    """`eval --json res.json` where res.json links to a shared file replaced the link with a plain file (and as root
    `--json /dev/full` replaced the device); `--json ''` silently wrote nothing; a quoted `~` made a folder named ~."""
    import os

    from attention_zoo.checkpoint import atomic_write_text
    from attention_zoo.errors import UserError
    from attention_zoo.paths import check_output_path

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "res.json").write_text("old\n")
    (tmp_path / "res.json").symlink_to(tmp_path / "shared" / "res.json")
    atomic_write_text(check_output_path("--json", tmp_path / "res.json", "file"), "new\n")
    assert (tmp_path / "res.json").is_symlink() and (tmp_path / "shared" / "res.json").read_text() == "new\n"
    with pytest.raises(UserError, match="--json /dev/null: not a regular file"):
        check_output_path("--json", "/dev/null", "file")
    with pytest.raises(UserError, match="--json: the path is empty"):
        check_output_path("--json", "", "file")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output_path("--out", "~/runs/x", "folder") == tmp_path / "runs" / "x"
    assert not os.path.exists("~")


def test_an_unknown_option_is_reported_with_its_commands_usage(capsys):
    """`train X --output d` shows train's usage (its real options), not the top-level `attention-zoo COMMAND`."""
    with pytest.raises(SystemExit) as info:
        main(["train", str(CONFIGS / "vanilla.yaml"), "--output", "d"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: attention-zoo train " in err and "--out OUT" in err
    assert "attention-zoo train: error: unrecognized arguments: --output d" in err


def test_a_checkpoint_path_that_does_not_exist_is_said_to_not_exist(capsys, tmp_path):
    typo = tmp_path / "runs" / "typo"
    code = main(["eval", str(typo)])
    assert code == 2 and f"{typo}: not a checkpoint or run folder: it does not exist" in capsys.readouterr().err
