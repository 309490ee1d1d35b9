"""`attention-zoo bench` end to end on tiny sizes: the files it writes, the table, the ratios, failures
recorded rather than fatal, clean errors for bad arguments, and every bench command in
docs/benchmarks.md run with tiny size overrides. No timing is asserted.

One test runs the real CLI with a subprocess per point; the others measure points in this process
(`run_point` patched) to stay fast.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from attention_zoo.bench import points as points_module
from attention_zoo.bench import runner, worker
from attention_zoo.cli import main
from attention_zoo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# head dim 8: x-transformers' rotary embedding (the peer runs on our rope stack) divides by its width - 2,
# a quarter of the head dim, so a head dim of 4 fails there with ZeroDivisionError
TINY = ["--seq-lens", "12", "--batch", "2", "--dim", "16", "--depth", "2", "--heads", "4", "--head-dim", "8",
        "--repeats", "1", "--warmup", "0", "--rounds", "1", "--no-progress"]


def read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| attention-zoo") or line.startswith("| x-transformers")]


@pytest.fixture
def in_process(monkeypatch):
    """Measure points in this process instead of one subprocess each (same code, no interpreter start)."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(runner, "run_point", lambda point, timeout, env=None: worker.measure_safely(point))
    yield
    torch.set_num_threads(threads)
    torch.compiler.reset()  # a --compile point's compiled frames stay with the process otherwise


def test_cli_end_to_end_in_subprocesses(run_cli, tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "--variants", "selective", "--backends", "sdpa", *TINY, "--repeats", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data, markdown = read(out)
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"vanilla", "selective"}  # vanilla added: the ratios need it
    for r in rows.values():
        assert r["status"] == "ok" and r["median_s"] > 0 and len(r["times_s"]) == 2
        assert r["peak_mb"] > r["activation_mb"] > 0 and r["memory"] == "peak RSS"
        assert r["tokens_per_s"] == pytest.approx(2 * 12 / r["median_s"])
    assert rows["vanilla"]["time_vs_vanilla"] == 1.0
    assert rows["selective"]["time_vs_vanilla"] == pytest.approx(rows["selective"]["median_s"] / rows["vanilla"]["median_s"])
    assert rows["selective"]["memory_vs_vanilla"] == pytest.approx(rows["selective"]["peak_mb"] / rows["vanilla"]["peak_mb"])
    assert data["complete"] and data["command"].startswith("attention-zoo bench")
    table = table_rows(markdown)
    assert [(r[1], r[2], r[3], r[5]) for r in table] == [("vanilla", "sdpa", "12", "fwdbwd"),
                                                         ("selective", "sdpa", "12", "fwdbwd")]
    assert all(r[-1] == "ok" for r in table)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]  # no temp files left
    printed = [line for line in result.stdout.splitlines() if line.startswith("|")]  # the table on the terminal too
    assert printed == [line for line in markdown.splitlines() if line.startswith("|")] and len(printed) == 4


def documented_bench_commands() -> list[list[str]]:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words[:2] == ["attention-zoo", "bench"]:
                commands.append(words[1:])
    return commands


def documented_plugin_modules() -> dict[str, str]:
    """The plug-in modules benchmarks.md prints (```python blocks opening with `# NAME.py`): file name -> code."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    return {match[0]: match[1] for match in re.findall(r"```python\n# (\w+\.py)\n(.*?)```", text, flags=re.S)}


def test_docs_have_bench_commands():
    assert len(documented_bench_commands()) >= 2


@pytest.mark.parametrize("argv", documented_bench_commands(), ids=lambda a: " ".join(a)[:70])
def test_documented_command_runs_with_tiny_sizes(argv, in_process, tmp_path, monkeypatch, isolated_registry):
    """Each command as written, with tiny sizes; a command's `--plugins` modules are the ones the page prints, on
    the path as the page says."""
    import torch

    if "cuda" in argv and not torch.cuda.is_available():
        pytest.skip("a GPU command; no CUDA here")
    if "--plugins" in argv:
        for name, code in documented_plugin_modules().items():
            (tmp_path / name).write_text(code)
        monkeypatch.syspath_prepend(str(tmp_path))
    if "--compile" in argv:  # inductor's compile of each point is slow and tests torch: dynamo with eager kernels
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    out = tmp_path / "out"
    assert main([*argv, *TINY, "--out", str(out)]) == 0  # later flags override the documented sizes
    data, markdown = read(out)
    # a YAML config is labelled by its file name
    variants = [Path(v).stem if v.endswith((".yaml", ".yml")) else v for v in argv[argv.index("--variants") + 1].split(",")]
    ours = {r["variant"] for r in data["results"] if r["impl"] == "attention-zoo" and r["status"] == "ok"}
    assert set(variants) <= ours
    assert len(table_rows(markdown)) == len(data["results"])
    if "--peer" in argv:
        compared = {c["variant"] for c in data["comparison"] if c["status"] == "ok"}
        assert {"vanilla", "selective"} <= compared
        assert "## Against x-transformers" in markdown


def test_fwd_mode_yaml_config_and_failed_points(in_process, tmp_path, capsys):
    """A YAML config is a variant (labelled by its file name); xformers on CPU fails per point with its
    reason while the rest of the sweep completes."""
    out = tmp_path / "out"
    code = main(["bench", "--variants", str(ROOT / "configs" / "selective_gqa.yaml"), "--backends", "sdpa,xformers",
                 "--mode", "fwd",
                 *TINY, "--out", str(out)])
    assert code == 0
    data, markdown = read(out)
    by_key = {(r["variant"], r["backend"]): r for r in data["results"]}
    assert by_key[("selective_gqa", "sdpa")]["status"] == "ok" and by_key[("selective_gqa", "sdpa")]["mode"] == "fwd"
    failed = by_key[("selective_gqa", "xformers")]
    assert failed["status"] == "failed" and "CUDA only" in failed["reason"]
    assert "failed: BackendRefused" in markdown
    assert "2 failed" in capsys.readouterr().out  # vanilla and selective_gqa on xformers


def test_profile_writes_where_each_points_time_went(in_process, tmp_path, capsys):
    """--profile: each ok point gets torch.profiler's table (ops by their own time) in results.json and
    profiles.md; a failed point says why it has none. Without the flag there is no profile anywhere."""
    out = tmp_path / "out"
    assert main(["bench", "--variants", "selective", "--backends", "sdpa,xformers", "--profile", *TINY, "--out", str(out)]) == 0
    data, _ = read(out)
    by_key = {(r["variant"], r["backend"]): r for r in data["results"]}
    for variant in ("vanilla", "selective"):
        table = by_key[(variant, "sdpa")]["profile"]
        assert "Self CPU" in table and "aten::" in table
        assert "profile" not in by_key[(variant, "xformers")]
    assert "aten::bmm" in by_key[("selective", "sdpa")]["profile"] or "aten::mm" in by_key[("selective", "sdpa")]["profile"]
    profiles = (out / "profiles.md").read_text()
    assert profiles.count("## attention-zoo") == 4 and profiles.count("```text") == 2
    assert "## attention-zoo selective on xformers, N=12 B=2 fwdbwd\n\nnot profiled: BackendRefused" in profiles
    assert "profiles.md" in capsys.readouterr().out

    plain = tmp_path / "plain"
    assert main(["bench", "--variants", "vanilla", *TINY, "--out", str(plain)]) == 0
    assert not (plain / "profiles.md").exists() and all("profile" not in r for r in read(plain)[0]["results"])


def test_a_failing_profiler_costs_the_table_not_the_point(monkeypatch):
    import torch.profiler

    def broken(*args, **kwargs):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    point = points_module.Point("attention-zoo", points_module.resolve_variant("vanilla"), "sdpa", 8, 1, "fwd",
                                dim=16, depth=1, heads=2, head_dim=8, warmup=0, repeats=1, profile=True)
    result = worker.measure_safely(point)
    assert result["status"] == "ok" and result["median_s"] > 0
    assert result["profile"] == "profiling failed: RuntimeError: no profiler here"


def test_run_point_records_timeouts_kills_and_crashes(monkeypatch):
    point = points_module.Point("attention-zoo", points_module.resolve_variant("vanilla"), "sdpa", 8, 1, "fwd",
                                dim=8, depth=1, heads=2, head_dim=4)
    assert runner.run_point(point, timeout=0.01)["reason"] == "timed out after 0.01 s"

    def fake(returncode, stderr=""):
        return lambda *a, **k: subprocess.CompletedProcess(a, returncode, "", stderr)

    monkeypatch.setattr(runner.subprocess, "run", fake(-9))
    assert runner.run_point(point, timeout=5)["reason"] == "worker killed by SIGKILL (likely out of memory)"
    monkeypatch.setattr(runner.subprocess, "run", fake(1, "Traceback (most recent call last):\nMemoryError: boom"))
    assert runner.run_point(point, timeout=5) == {"status": "failed", "reason": "worker exited 1: MemoryError: boom"}


@pytest.mark.parametrize("args,message", [
    (["--variants", "selectiv"], "did you mean 'selective'"),
    (["--variants", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["--backends", "flash"], "unknown backend 'flash'"),
    (["--mode", "train"], "unknown mode 'train'"),
    (["--compile", "off,yes"], "--compile: unknown value 'yes'; valid: off, on"),
    (["--dtype", "float8"], "'float8' is not one of"),
    (["--peer", "timm"], "unknown peer 'timm'"),
    (["--env", "NOVALUE"], "expected KEY=VALUE"),
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),  # before any point runs
    (["--variants", "gqa", "--heads", "3"], "variant 'gqa'"),
])
def test_bad_arguments_are_clean_user_errors(args, message, tmp_path, capsys):
    assert main(["bench", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_ratios_use_the_same_backend_length_batch_and_mode():
    def row(variant, backend, n, s, mb, impl="attention-zoo", status="ok"):
        return {"impl": impl, "variant": variant, "backend": backend, "seq_len": n, "batch": 1, "mode": "fwdbwd",
                "dtype": "float32", "device": "cpu", "status": status, "median_s": s, "peak_mb": mb, "activation_mb": mb / 2}

    rows = runner.with_ratios([row("vanilla", "sdpa", 8, 1.0, 100), row("vanilla", "math", 8, 2.0, 300),
                               row("selective", "sdpa", 8, 1.5, 150), row("selective", "math", 8, 3.0, 600),
                               row("selective", "sdpa", 16, 1.0, 100)])
    assert [r.get("time_vs_vanilla") for r in rows] == [1.0, 1.0, 1.5, 1.5, None]  # no vanilla at 16
    assert [r.get("memory_vs_vanilla") for r in rows] == [1.0, 1.0, 1.5, 2.0, None]
    peer = runner.peer_comparison(rows + [row("selective", "math", 8, 6.0, 1200, impl="x-transformers")])
    assert [(c["backend"], c["time_ours_over_peer"], c["memory_ours_over_peer"]) for c in peer] == [
        ("sdpa", 0.25, 0.125), ("math", 0.5, 0.5)]
    for c in peer:  # peaks include each process's imports; the step's own memory is compared too
        c_rows = [r for r in rows if r["backend"] == c["backend"] and r["seq_len"] == 8 and r["variant"] == "selective"]
        assert c["activation_ours_over_peer"] == c_rows[0]["activation_mb"] / 600


def test_peer_equivalents():
    kw = {name: points_module.peer_kwargs(points_module.resolve_variant(name), 4) for name in points_module.PRESETS}
    assert kw["vanilla"] == ({"attn_flash": True}, "sdpa")
    assert kw["gqa"] == ({"attn_kv_heads": 2, "attn_flash": True}, "sdpa")
    assert kw["selective_gqa"] == ({"attn_kv_heads": 2, "attn_selective": True}, "math")
    assert kw["selective_residual"] == ({"attn_selective": True, "residual_attn": True}, "math")
    assert kw["residual"] == ({"residual_attn": True}, "math")
    assert kw["cross_layer_share"][0] is None and "no equivalent" in kw["cross_layer_share"][1]


def test_ratios_with_rounds_are_taken_within_each_round():
    """Background load that comes and goes: each round's ratio is computed within the round."""
    def row(variant, rounds, impl="attention-zoo"):
        return {"impl": impl, "variant": variant, "backend": "sdpa", "seq_len": 8, "batch": 1, "mode": "fwdbwd",
                "dtype": "float32", "device": "cpu", "status": "ok", "median_s": sorted(rounds)[1], "peak_mb": 100,
                "activation_mb": 50, "round_median_s": rounds, "round_peak_mb": [100, 100, 100]}

    # round 2 was loaded from the middle on: selective's 2.4 s there says nothing about selective
    rows = runner.with_ratios([row("vanilla", [1.0, 1.0, 2.0]), row("selective", [1.1, 2.4, 2.2])])
    assert rows[1]["time_vs_vanilla"] == pytest.approx(1.1)  # median of 1.1, 2.4, 1.1


def test_an_interrupted_sweep_still_reports_the_points_that_finished(monkeypatch, tmp_path, capsys):
    """Ctrl-C, or .ci/gpu's time limit (SIGINT), in the middle of a sweep: results.json/md/png hold the
    finished points and mark the rest pending; the command exits 130 without a traceback."""
    import torch

    threads = torch.get_num_threads()
    calls = []

    def first_then_interrupt(point, timeout, env=None):
        calls.append(point)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return worker.measure_safely(point)

    monkeypatch.setattr(runner, "run_point", first_then_interrupt)
    out = tmp_path / "out"
    code = main(["bench", "--variants", "selective", "--backends", "sdpa", "--mode", "fwd", *TINY, "--out", str(out)])
    torch.set_num_threads(threads)
    assert code == 130 and "interrupted" in capsys.readouterr().err
    data, markdown = read(out)
    assert not data["complete"] and [r["status"] for r in data["results"]] == ["ok", "pending"]
    assert "**Interrupted** after 1 of 2 points" in markdown
    assert [row[-1] for row in table_rows(markdown)] == ["ok", "pending"]
    assert (out / "results.png").is_file()


def test_the_peer_is_built_on_our_default_stack():
    """x-transformers gets rotary positions, RMSNorm and a bias-free SwiGLU like our presets: parameter counts
    agree within 1% (its SwiGLU width is int(8/3 * dim), ours rounds 2/3 * 4 * dim up to a multiple of 8)."""
    from x_transformers import Decoder, TransformerWrapper

    from attention_zoo import build_model
    from attention_zoo.config import STACK_DEFAULTS

    wrapper, decoder = points_module.peer_stack(STACK_DEFAULTS, 32)
    assert wrapper == {"use_abs_pos_emb": False} and decoder["rotary_emb_dim"] == 32 and decoder["use_rmsnorm"]
    peer = TransformerWrapper(num_tokens=256, max_seq_len=64, tie_embedding=True, **wrapper,
                              attn_layers=Decoder(dim=128, depth=2, heads=4, attn_dim_head=32, **decoder))
    ours = build_model({"model": {"dim": 128, "depth": 2, "heads": 4, "max_seq_len": 64}})
    assert abs(sum(p.numel() for p in peer.parameters()) / ours.num_parameters() - 1) < 0.01
    assert points_module.peer_stack({"position": "learned", "norm": "layernorm", "mlp": "gelu"}, 32) == ({}, {})


def test_a_list_item_given_twice_is_one_point():
    """--seq-lens 16,16 measured every point twice, and each row's ratio went to whichever vanilla came last
    (the first vanilla read 0.46x itself)."""
    from attention_zoo.cli import build_parser

    args = build_parser().parse_args(["bench", "--seq-lens", "16,32,16", "--batch", "2,2", "--mode", "fwd,fwd",
                                      "--backends", "sdpa,math,sdpa", "--out", "o"])
    assert (args.seq_lens, args.batch, args.mode, args.backends) == ([16, 32], [2], ["fwd"], ["sdpa", "math"])


def test_variants_sharing_a_label_are_refused(tmp_path, capsys):
    """Rows, rounds and ratios are keyed by a variant's label, and a config file is labelled by its file name: a
    selective config saved as vanilla.yaml became a second `vanilla` row and the ratios' baseline (the real vanilla
    read 0.56x), and a.yaml from two folders pooled into one label. The same file twice is one variant."""
    from attention_zoo.bench import BenchSettings, plan

    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "vanilla.yaml").write_text("model:\n  attention: {variant: selective}\n")
        (tmp_path / folder / "a.yaml").write_text("model:\n  attention: {variant: selective}\n")
    x, y = tmp_path / "x", tmp_path / "y"
    assert main(["bench", "--variants", f"{x}/vanilla.yaml", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"'vanilla' and '{x / 'vanilla.yaml'}' share the label 'vanilla'" in err and "ratios' baseline" in err
    with pytest.raises(UserError, match=f"'{x / 'a.yaml'}' and '{y / 'a.yaml'}' share the label 'a'"):
        plan(BenchSettings(variants=[f"{x}/a.yaml", f"{y}/a.yaml"], seq_lens=[16]))
    points = plan(BenchSettings(variants=[f"{x}/a.yaml", f"{x}/../x/a.yaml"], seq_lens=[16]))
    assert [p.variant.label for p in points] == ["vanilla", "a"]


def test_a_negative_value_that_rounds_to_zero_reads_zero():
    """The activation column showed "-0" where a point's RSS shrank by a fraction of a MB."""
    from attention_zoo.bench.report import _f

    assert [_f(-0.3, ",.0f"), _f(-0.004, ".2f"), _f(-1.6, ",.0f"), _f(-0.02, ".2f"), _f(None, ".2f")] == \
        ["0", "0.00", "-2", "-0.02", "-"]


def test_compile_axis_measures_each_point_eager_and_compiled_with_ratios_between_them(in_process, tmp_path, monkeypatch):
    """--compile off,on: every point eager and under torch.compile in one run (torch.compile spied on here and
    run with dynamo's eager backend, to stay fast), each compiled point after one untimed compiling step
    (compile_s); a compiled point's ratio to vanilla is to compiled vanilla, and time / eager is over its eager
    twin. The table gains the compile and time / eager columns."""
    import torch

    compile_ = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or compile_(model, backend="eager"))
    out = tmp_path / "out"
    assert main(["bench", "--variants", "selective", "--compile", "off,on", *TINY, "--out", str(out)]) == 0
    data, markdown = read(out)
    assert compiled == [{}, {}]  # vanilla's and selective's compiled points: train.compile's defaults
    rows = {(r["variant"], r["compile"]): r for r in data["results"]}
    assert set(rows) == {(v, c) for v in ("vanilla", "selective") for c in ("off", "on")}
    assert all(r["status"] == "ok" for r in rows.values())
    for variant in ("vanilla", "selective"):
        on, off = rows[(variant, "on")], rows[(variant, "off")]
        assert on["compile_s"] > 0 and "compile_s" not in off and "time_vs_eager" not in off
        assert on["time_vs_eager"] == pytest.approx(on["median_s"] / off["median_s"])
        assert on["time_vs_vanilla"] == pytest.approx(on["median_s"] / rows[("vanilla", "on")]["median_s"])
        assert off["time_vs_vanilla"] == pytest.approx(off["median_s"] / rows[("vanilla", "off")]["median_s"])
    assert "| mode | compile | median s |" in markdown and "| time / vanilla | time / eager |" in markdown
    table = table_rows(markdown)
    assert [(r[1], r[6]) for r in table] == [("vanilla", "off"), ("selective", "off"), ("vanilla", "on"),
                                            ("selective", "on")]
    assert [r[12] for r in table] == ["-", "-", f"{rows[('vanilla', 'on')]['time_vs_eager']:.2f}",
                                      f"{rows[('selective', 'on')]['time_vs_eager']:.2f}"]
    assert main(["bench", "--variants", "selective", *TINY, "--out", str(tmp_path / "eager")]) == 0
    header = next(line for line in read(tmp_path / "eager")[1].splitlines() if line.startswith("| impl"))
    assert "compile" not in header and "eager" not in header  # without compiled points the table is as it was
