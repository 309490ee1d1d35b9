"""The selection op (attention_zoo/ops/selection) against a naive reference written here from the equations.

Selective attention (Leviathan, Kalman, Matias, ICLR 2025, section 3): S[i, j] = ReLU(scale q_s[i] . k_s[j])
for keys strictly earlier than query i (never BOS if protected), F[i, j] = accumulated[j] + sum over i' < i of
S[i', j], out = softmax(scale q k^T - F + causal) v. The naive reference below loops over rows and keys.

Tolerances: fp32 |diff| <= 1e-5 * max(1, largest |value|), float64 1e-10, outputs and every gradient
(q, k, v, each term's selection q and k, and a cache's accumulator).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attention_zoo import build_model
from attention_zoo.ops.selection import Selection, SelectionTerm, cpu_fused, reference
from attention_zoo.ops.selection.blocked import column_sums
from attention_zoo.ops.selection.blocked import selective_attention as blocked_attention
from tests.cpu_kernel import needs_cpu_kernel, require_kernel
from tests.spies import LargestTensor

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

def kernel_attention(q, k, v, selection, *, scale, rows=None, chunk=None):
    require_kernel()
    return cpu_fused.selective_attention(q, k, v, selection, causal=True, scale=scale, rows=rows, chunk=chunk)


def close(actual, expected, dtype, what):
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, atol=TOL[dtype] * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def naive_penalty(selection: Selection) -> torch.Tensor:
    """F by loops: row i, key j, earlier rows i' (bottom-right aligned: query i sits at key index Nk - Nq + i)."""
    B, Nq, Nk = selection.shape
    F = torch.zeros(B, Nq, Nk, dtype=torch.promote_types(selection.terms[0].q.dtype, torch.float32))
    F = F + 0 * sum(t.q.sum() + t.k.sum() for t in selection.terms)  # keep autograd's graph for the gradients
    rows = []
    for i in range(Nq):
        row = []
        for j in range(Nk):
            total = 0
            for t in selection.terms:
                value = 0 if t.accumulated is None else t.accumulated[:, j]
                for earlier in range(i):
                    position = Nk - Nq + earlier
                    if j < position and not (t.protect_bos and j == 0):
                        value = value + torch.relu(t.scale * (t.q[:, earlier] * t.k[:, j]).sum(-1))
                total = total + t.weight * value
            row.append(total if torch.is_tensor(total) else F[:, i, j])
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=1)


def naive_attention(q, k, v, selection, scale):
    H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale - naive_penalty(selection)[:, None]
    visible = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


def problem(*, B=2, H=4, Hkv=2, Nq=13, Nk=13, D=8, terms=1, accumulated=False, protect_bos=True,
            dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    q, k, v = make(B, H, Nq, D), make(B, Hkv, Nk, D), make(B, Hkv, Nk, D)
    leaves, parts = [q, k, v], []
    for t in range(terms):
        qs, ks = make(B, Nq, D), make(B, Nk, D)
        acc = torch.rand(B, Nk, generator=g, dtype=dtype).requires_grad_() if accumulated else None
        leaves += [qs, ks] + ([acc] if accumulated else [])
        parts.append(SelectionTerm(qs, ks, 0.6, protect_bos, 1.0 if t == 0 else 0.5, acc))
    return q, k, v, Selection(tuple(parts)), leaves


def value_and_grads(fn, leaves, seed=7):
    out = fn()
    # drawn in float64 and cast: float32 and float64 runs of one problem get the same weights
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return [out, *torch.autograd.grad((out * weights).sum(), leaves)]


CASES = {
    "one-head": {},
    "mqa": {"Hkv": 1},
    "mha": {"Hkv": 4},
    "no-bos": {"protect_bos": False},
    "accumulate-two-terms": {"terms": 2},
    "cached-chunk": {"Nq": 5, "Nk": 13, "accumulated": True},
    "cached-chunk-two-terms": {"Nq": 4, "Nk": 11, "accumulated": True, "terms": 2},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["reference", "blocked", pytest.param("cpu-kernel", marks=needs_cpu_kernel)])
def test_op_matches_naive_equations(impl, case, dtype):
    q, k, v, selection, leaves = problem(dtype=dtype, **CASES[case])
    if impl == "reference":
        got = value_and_grads(lambda: reference.selective_attention(q, k, v, selection, causal=True, scale=0.3), leaves)
    elif impl == "blocked":  # blocks of 4 rows: several blocks, a partial last one, the running sums cross blocks
        got = value_and_grads(lambda: blocked_attention(q, k, v, selection, causal=True, scale=0.3, rows=4), leaves)
    else:  # and tiles of 5 keys: several per block, a partial last one, the online softmax crosses them
        got = value_and_grads(lambda: kernel_attention(q, k, v, selection, scale=0.3, rows=4, chunk=5), leaves)
    want = value_and_grads(lambda: naive_attention(q, k, v, selection, 0.3), leaves)
    for index, (a, b) in enumerate(zip(got, want)):
        close(a, b, dtype, "output" if index == 0 else f"grad of input {index - 1}")


OPS = {"blocked": lambda q, k, v, selection, scale, rows, chunk=None: blocked_attention(
           q, k, v, selection, causal=True, scale=scale, rows=rows),
       "cpu-kernel": lambda q, k, v, selection, scale, rows, chunk=None: kernel_attention(
           q, k, v, selection, scale=scale, rows=rows, chunk=chunk)}
OP_PARAMS = ["blocked", pytest.param("cpu-kernel", marks=needs_cpu_kernel)]


@pytest.mark.parametrize("op", OP_PARAMS)
@pytest.mark.parametrize("batch", [3, 1])
@pytest.mark.parametrize("case", ["mqa", "mha", "accumulate-two-terms", "cached-chunk-two-terms"])
def test_op_split_over_threads_matches_naive_equations(case, batch, op):
    """With 2 intra-op threads the batch elements (3: an uneven split) are shared out among 2 worker threads
    in the forward and the backward (1: the kernel's forward splits the heads instead, its backward the kv-head
    groups: 2 or 4 of them here, 1 for MQA); results as with one thread, the thread count restored after."""
    q, k, v, selection, leaves = problem(dtype=torch.float64, B=batch, **CASES[case])
    want = value_and_grads(lambda: naive_attention(q, k, v, selection, 0.3), leaves)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = value_and_grads(lambda: OPS[op](q, k, v, selection, 0.3, 4, 5), leaves)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for index, (a, b) in enumerate(zip(got, want)):
        close(a, b, torch.float64, "output" if index == 0 else f"grad of input {index - 1}")


def test_reference_penalty_matches_naive_loops():
    _, _, _, selection, _ = problem(Nq=6, Nk=9, accumulated=True, terms=2)
    close(reference.penalty(selection), naive_penalty(selection), torch.float64, "F")
    close(selection.dense(), naive_penalty(selection), torch.float64, "dense F")


@pytest.mark.parametrize("op", OP_PARAMS)
@pytest.mark.parametrize("rows, chunk", [(1, 7), (3, 150), (16, 1), (64, 40), (200, 64)])
def test_block_size_changes_nothing_beyond_fp32_rounding(rows, chunk, op):
    q, k, v, selection, leaves = problem(Nq=150, Nk=150, D=16, terms=2, dtype=torch.float32, seed=3)
    base = value_and_grads(lambda: reference.selective_attention(q, k, v, selection, causal=True, scale=0.25), leaves)
    other = value_and_grads(lambda: OPS[op](q, k, v, selection, 0.25, rows, chunk), leaves)
    for index, (a, b) in enumerate(zip(other, base)):
        close(a, b, torch.float32, f"rows={rows}, chunk={chunk}, {'output' if index == 0 else f'grad {index - 1}'}")


@pytest.mark.parametrize("op", OP_PARAMS)
def test_gradients_are_bit_identical_on_repeat(op):
    q, k, v, selection, leaves = problem(Nq=100, Nk=100, dtype=torch.float32, terms=2)
    first = value_and_grads(lambda: OPS[op](q, k, v, selection, 0.3, 16, 32), leaves)
    second = value_and_grads(lambda: OPS[op](q, k, v, selection, 0.3, 16, 32), leaves)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@needs_cpu_kernel
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", ["mha", "accumulate-two-terms"])
def test_kernel_gives_the_same_bits_for_any_thread_count(case, batch):
    """One thread, or 2 sharing the batch elements (batch 3) or a batch element's heads and kv-head groups
    (batch 1): every sum runs in the same order, so outputs and gradients agree bit for bit."""
    q, k, v, selection, leaves = problem(dtype=torch.float32, B=batch, Nq=40, Nk=40, **CASES[case])
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(value_and_grads(lambda: kernel_attention(q, k, v, selection, scale=0.3, rows=8, chunk=16),
                                        leaves))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_cpu_kernel
def test_kernel_under_a_strong_selection_matches_the_equations():
    """F in the thousands (a selection head with large scores over 300 rows): most probabilities underflow. The
    kernel's exp returns 0 below exp(-60) of the row's largest instead of making denormals; the outputs and
    gradients still match the reference in float64 to fp32 tolerance (1e-5, relative to the largest value)."""
    q, k, v, selection, leaves = problem(B=1, Nq=300, Nk=300, D=16, dtype=torch.float32, seed=5)
    strong = Selection(tuple(SelectionTerm(t.q, t.k, 4.0, t.protect_bos, t.weight, t.accumulated) for t in selection.terms))
    assert strong.dense().max() > 1000
    got = value_and_grads(lambda: kernel_attention(q, k, v, strong, scale=0.3, rows=64, chunk=128), leaves)
    as64 = [t.detach().double().requires_grad_() for t in leaves]
    strong64 = Selection((SelectionTerm(as64[3], as64[4], 4.0, True, 1.0, None),))
    want = value_and_grads(lambda: reference.selective_attention(*as64[:3], strong64, causal=True, scale=0.3), as64)
    for index, (a, b) in enumerate(zip(got, want)):
        close(a.double(), b, torch.float32, "output" if index == 0 else f"grad of input {index - 1}")


@needs_cpu_kernel
def test_kernel_output_ignores_later_keys_bit_for_bit():
    """Causality inside the kernel's tiles: changing keys and values from position 40 on leaves rows 0-39 of the
    output bit-identical (tiles of 16 keys, blocks of 8 rows, so the diagonal crosses tiles and blocks)."""
    q, k, v, selection, _ = problem(B=1, Nq=64, Nk=64, D=16, dtype=torch.float32, seed=2)
    with torch.no_grad():
        first = kernel_attention(q, k, v, selection, scale=0.3, rows=8, chunk=16)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 40:] += 1.0
        v2[:, :, 40:] -= 2.0
        second = kernel_attention(q, k2, v2, selection, scale=0.3, rows=8, chunk=16)
    assert torch.equal(first[:, :, :40], second[:, :, :40])
    assert not torch.equal(first[:, :, 40:], second[:, :, 40:])


def test_column_sums_are_the_next_rows_penalty():
    """A cache adds the chunk's column sums of S: F of the row after the chunk, minus what it had."""
    _, _, _, selection, _ = problem(Nq=9, Nk=20, accumulated=True)
    term = selection.terms[0]
    S = reference.scores(term)
    torch.testing.assert_close(column_sums(term, rows=4), S.sum(dim=1), atol=1e-12, rtol=0)


def test_a_selection_checks_its_shapes():
    q, k = torch.zeros(2, 5, 4), torch.zeros(2, 7, 4)
    with pytest.raises(ValueError, match="accumulated must be"):
        SelectionTerm(q, k, 1.0, accumulated=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="more selection queries"):
        SelectionTerm(k, q, 1.0)
    with pytest.raises(ValueError, match="disagree"):
        Selection((SelectionTerm(q, k, 1.0), SelectionTerm(q, q, 1.0)))


# --------------------------------------------------------------------------- no (B, N, N) in training


def saved_bytes(step) -> int:
    """Bytes autograd keeps for the backward during `step` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


ATTENTIONS = {
    "vanilla": {"variant": "vanilla"},
    "selective": {"variant": "selective"},
    "selective-gqa": {"variant": "selective", "kv_heads": 1},
    "share": {"variant": "cross_layer_selective", "mode": "share", "sources": [0]},
    "accumulate": {"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0, 1], "decay": 0.5},
}
B, N, DEPTH = 2, 1024, 2


def training_step(attention):
    torch.manual_seed(0)
    model = build_model({"backend": "sdpa", "model": {"vocab_size": 32, "dim": 32, "depth": DEPTH, "heads": 2,
                                                      "max_seq_len": N, "attention": attention}})
    tokens = torch.randint(0, 32, (B, N), generator=torch.Generator().manual_seed(1))

    def step():
        model(tokens).float().logsumexp(-1).mean().backward()
    return step


@pytest.fixture(scope="module")
def vanilla_saved():
    return saved_bytes(training_step(ATTENTIONS["vanilla"]))


@pytest.mark.parametrize("name", ["selective", "selective-gqa", "share", "accumulate"])
def test_training_step_makes_no_B_N_N_storage(name, vanilla_saved):
    """At N = 1024 on CPU: no op writes a storage of B * N * N elements (F would be one), and what autograd
    keeps for the backward exceeds vanilla's by less than a tenth of one float32 F per layer (the boundary
    rows G are 1/64 of it). With the dense F handed to sdpa instead, both checks fail (1 F written, 1.7 kept)."""
    step = training_step(ATTENTIONS[name])
    spy = LargestTensor()
    with spy:
        step()
    assert spy.largest < B * N * N // 4, f"an op wrote {spy.largest} elements"
    extra = saved_bytes(training_step(ATTENTIONS[name])) - vanilla_saved
    assert extra < DEPTH * B * N * N * 4 // 10, f"{extra} bytes more saved than vanilla"


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("Hkv, D, Dv", [(2, 24, 8), (4, 8, 8), (1, 8, 16)], ids=["gqa-wide-qk", "mha", "mqa-wide-v"])
def test_kernel_without_selection_is_plain_causal_attention_with_any_value_width(Hkv, D, Dv, dtype):
    """No selection term: softmax(scale q k^T + causal) v, q/k and v of any two widths (residual attention's
    concatenated q/k attend with a narrower v), against the plain formula; blocks of 4 rows, tiles of 5 keys,
    with 4 cached keys (bottom-right aligned)."""
    g = torch.Generator().manual_seed(11)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    q, k, v = make(2, 4, 9, D), make(2, Hkv, 13, D), make(2, Hkv, 13, Dv)
    require_kernel()
    got = value_and_grads(lambda: cpu_fused.attention(q, k, v, causal=True, scale=0.4, rows=4, chunk=5), [q, k, v])

    def naive():
        kk, vv = (t.repeat_interleave(4 // Hkv, dim=1) for t in (k, v))
        visible = torch.ones(9, 13, dtype=torch.bool).tril(13 - 9)
        return torch.softmax((q @ kk.transpose(-1, -2) * 0.4).masked_fill(~visible, float("-inf")), dim=-1) @ vv
    want = value_and_grads(naive, [q, k, v])
    for index, (a, b) in enumerate(zip(got, want)):
        close(a, b, dtype, "output" if index == 0 else f"grad of input {index - 1}")


@needs_cpu_kernel
def test_sdpa_runs_the_kernel_on_cpu_and_the_blocked_op_where_it_is_refused(monkeypatch):
    """The sdpa backend's selective call goes to the fused kernel where it builds, to the blocked PyTorch op where
    it does not (`refusal()` set, as without a compiler or with ATTENTION_ZOO_CPU_KERNEL=0): same logits and
    gradients (fp32, 1e-5 relative), and each path is the one taken (the other op is made to raise)."""
    attention = {"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0, 1], "decay": 0.5}

    def step():
        torch.manual_seed(0)
        model = build_model({"backend": "sdpa", "model": {"vocab_size": 32, "dim": 32, "depth": 3, "heads": 2,
                                                          "max_seq_len": 64, "attention": attention}})
        logits = model(torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(1)))
        logits.logsumexp(-1).mean().backward()
        return [logits.detach()] + [p.grad for p in model.parameters()]

    def refuse(*args, **kwargs):
        raise AssertionError("the other op ran")

    require_kernel()
    with monkeypatch.context() as patch:
        patch.setattr("attention_zoo.ops.selection.blocked.selective_attention", refuse)
        fused = step()
    monkeypatch.setattr(cpu_fused, "_state", {"refusal": "ATTENTION_ZOO_CPU_KERNEL=0"})
    monkeypatch.setattr(cpu_fused, "selective_attention", refuse)
    blocked = step()
    for a, b in zip(fused, blocked):
        close(a, b, torch.float32, "logits or a gradient")


@needs_cpu_kernel
def test_a_build_killed_half_way_is_redone_not_waited_on(tmp_path):
    """torch's build lock is a plain file that a build killed by a signal or a time limit leaves behind; the
    kernel's loader takes an flock (released when its holder dies) and clears such a file, so the next process
    loads (or rebuilds) instead of waiting forever. Here: the lock file a killed build leaves, then a fresh process."""
    require_kernel()
    stale = cpu_fused.build_directory() / "lock"
    stale.touch()
    code = "from attention_zoo.ops.selection import cpu_fused; assert cpu_fused.kernel() is not None, cpu_fused.refusal()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists()


@needs_cpu_kernel
def test_another_checkout_of_the_same_source_loads_the_built_kernel(tmp_path):
    """torch writes a source's path into build.ninja: building from the checkout's own file made two checkouts of
    one commit (a clone, a worktree) rebuild each other's kernel in turn, about a minute each. The build reads a
    copy inside its folder: a copied checkout loads the same .so without rebuilding it."""
    import os
    import shutil
    from pathlib import Path

    require_kernel()
    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "checkout"
    shutil.copytree(root, other, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info"))
    built = cpu_fused.build_directory() / f"{cpu_fused.build_name()}.so"
    before = built.stat().st_mtime_ns
    code = ("from attention_zoo.ops.selection import cpu_fused; import sys; assert cpu_fused.kernel() is not None, "
            "cpu_fused.refusal(); assert cpu_fused.__file__.startswith(sys.argv[1]), cpu_fused.__file__")
    done = subprocess.run([sys.executable, "-c", code, str(other)], capture_output=True, text=True, timeout=300,
                          cwd=other, env={**os.environ, "PYTHONPATH": str(other)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert built.stat().st_mtime_ns == before, "the copied checkout rebuilt the kernel"


@needs_cpu_kernel
def test_a_process_waiting_on_another_ones_build_says_so(tmp_path):
    """A second process started while the first builds waited up to a minute without a word (a prefill of 76 s
    in one trial): it now logs that it waits, and loads once the lock is free."""
    import fcntl

    require_kernel()
    lock = cpu_fused.build_directory().with_name(cpu_fused.build_name() + ".lock")
    code = "from attention_zoo.ops.selection import cpu_fused; assert cpu_fused.kernel() is not None, cpu_fused.refusal()"
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # this process "builds"
        waiter = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        try:
            first = waiter.stderr.readline()  # blocks until the waiter says something
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
        _, rest = waiter.communicate(timeout=300)
    assert "waiting for another process to finish building the fused CPU selective-attention kernel" in first
    assert waiter.returncode == 0, rest[-2000:]


@needs_cpu_kernel
@pytest.mark.parametrize("where", ["q", "k"])
def test_kernel_propagates_nan_in_the_selection_as_the_reference_does(where):
    """A NaN in the selection head's q or k reaches F and the outputs, as in the reference (ReLU keeps NaN), rather
    than being clipped to 0 and hidden."""
    q, k, v, selection, _ = problem(dtype=torch.float32, accumulated=True)
    term = selection.terms[0]
    with torch.no_grad():
        (term.q if where == "q" else term.k)[0, 5 if where == "q" else 3, 0] = float("nan")
        got = kernel_attention(q, k, v, selection, scale=0.3, rows=4, chunk=5)
        want = reference.selective_attention(q, k, v, selection, causal=True, scale=0.3)
    assert want.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())


@needs_cpu_kernel
@pytest.mark.parametrize("empty", ["batch", "queries"])
def test_an_empty_batch_or_query_set_gives_an_empty_result(empty):
    """B = 0 or Nq = 0 killed the process (SIGFPE: the kernel divides its work by these sizes), in a subprocess
    here so that a regression fails the test instead of the run; selective and plain calls both."""
    require_kernel()
    B, Nq = (0, 6) if empty == "batch" else (2, 0)
    code = f"""
import torch
from attention_zoo.ops.selection import Selection, cpu_fused
q = torch.randn({B}, 4, {Nq}, 8, requires_grad=True)
k, v = torch.randn({B}, 2, 6, 8), torch.randn({B}, 2, 6, 8)
out = cpu_fused.attention(q, k, v[..., :4], causal=True, scale=0.3)
out.sum().backward()
selective = cpu_fused.selective_attention(q, k, v, Selection.of_head(q[:, 0].detach(), k[:, 0], 0.3), causal=True,
                                          scale=0.3)
print(tuple(out.shape), tuple(selective.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"({B},", "4,", f"{Nq},", "4)", f"({B},", "4,", f"{Nq},", "8)"]
