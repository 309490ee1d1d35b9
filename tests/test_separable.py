"""SeparableBias (row_i + col_j per head): the fold into q and k against a naive reference written from the
formula, outputs and gradients; when it folds and when it goes dense (and that dense really is avoided);
float32 precision at the |c| Forgetting Attention reaches; shape errors; residual carry; describe's plan."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from attention_zoo import SeparableBias
from attention_zoo.backends import AttentionCall, fold_plan
from attention_zoo.cli import main
from attention_zoo.functional import attention
from attention_zoo.ops import residual
from attention_zoo.ops.separable import fold


def naive(q, k, v, row, col, scale):
    """out[b, h, i] = sum_j softmax_j(scale q_i . k_j + row_i + col_j) v_j over the keys query i sees (j <= Nk - Nq
    + i), query head h reading kv head h // (H / Hkv): loops over the formula, no shared code."""
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=q.dtype)
    for b, h, i in itertools.product(range(B), range(H), range(Nq)):
        kv = h // (H // Hkv)
        seen = Nk - Nq + i + 1
        r = 0.0 if row is None else row[min(b, row.shape[0] - 1), min(h, row.shape[1] - 1), i]
        c = col[min(b, col.shape[0] - 1), min(h, col.shape[1] - 1), :seen]
        scores = scale * (k[b, kv, :seen] @ q[b, h, i]) + r + c
        out[b, h, i] = torch.softmax(scores, dim=0) @ v[b, kv, :seen]
    return out


def tensors(B=2, H=4, Hkv=2, Nq=6, Nk=6, D=8, col_shape=None, row=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, dtype=dtype, generator=g).requires_grad_()
    cb, ch = col_shape or (B, H)
    col = (3 * torch.randn(cb, ch, Nk, dtype=dtype, generator=g)).requires_grad_()
    r = (3 * torch.randn(cb, ch, Nq, dtype=dtype, generator=g)).requires_grad_() if row else None
    return q, k, v, col, r


CASES = [  # (H, Hkv, col batch 1?, col per head?, Nq, Nk, row?)
    (4, 4, False, True, 6, 6, True), (4, 2, False, True, 6, 6, True), (4, 1, False, True, 6, 6, True),
    (4, 2, True, False, 6, 6, True), (4, 1, True, True, 6, 6, False), (4, 1, False, True, 6, 12, True),
    (4, 2, False, False, 1, 8, True),  # decoding: dense (test_decoding_takes_the_dense_bias_prefill_folds)
]


@pytest.mark.parametrize("H,Hkv,batch_shared,per_head,Nq,Nk,with_row", CASES)
def test_folded_attention_matches_the_formula_with_gradients(H, Hkv, batch_shared, per_head, Nq, Nk, with_row):
    """float64, atol 1e-10 on outputs and the gradients of q, k, v, col: GQA groups of 1, 2 and 4 query heads,
    a batch- or head-shared column, a cache (Nq < Nk), one decoding query, with and without a row term."""
    B = 2
    q, k, v, col, row = tensors(B, H, Hkv, Nq, Nk, col_shape=(1 if batch_shared else B, H if per_head else 1),
                                row=with_row)
    scale = 0.3
    got = attention(q, k, v, bias=SeparableBias(col=col, row=row), backend="sdpa", scale=scale)
    expected = naive(q, k, v, row, col, scale)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [q, k, v, col])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [q, k, v, col] + ([row] if with_row else []))
    for name, a, b in zip("q k v col".split(), grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"d{name}")
    if with_row:  # softmax gives the row term no gradient: the fold drops it
        assert expected_grads[-1].abs().max() < 1e-10


def test_the_fold_is_scale_qk_plus_the_column_term():
    """q' k'^T = scale q k^T + col per query head (GQA groups of 4): the identity the fold rests on."""
    q, k, _, col, _ = tensors(B=2, H=8, Hkv=2, Nq=5, Nk=5, D=4)
    scale = 0.5
    q2, k2 = fold(q, k, SeparableBias(col=col), scale)
    assert q2.shape == (2, 8, 5, 8) and k2.shape == (2, 2, 5, 8)  # D + G, G = 4
    for h in range(8):
        lhs = q2[:, h] @ k2[:, h // 4].transpose(-1, -2)
        rhs = scale * q[:, h] @ k[:, h // 4].transpose(-1, -2) + col[:, h, None, :]
        torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)


def test_gradcheck_through_the_fused_kernel():
    """torch.autograd.gradcheck (float64, finite differences) of the folded path in q, k, v and col."""
    q, k, v, col, _ = tensors(B=1, H=2, Hkv=1, Nq=4, Nk=4, D=4)
    assert torch.autograd.gradcheck(
        lambda q, k, v, col: attention(q, k, v, bias=SeparableBias(col=col), backend="sdpa"), (q, k, v, col))


def test_a_folding_backend_never_makes_the_dense_bias(monkeypatch):
    """sdpa folds float32 and float64 calls: the (Nq, Nk) tensor is never made; math, the reference, makes it."""
    made = []
    dense = SeparableBias.dense
    monkeypatch.setattr(SeparableBias, "dense", lambda self, *a: made.append(1) or dense(self, *a))
    for dtype in (torch.float32, torch.float64):
        q, k, v, col, row = tensors(dtype=dtype)
        attention(q, k, v, bias=SeparableBias(col=col, row=row), backend="sdpa").sum().backward()
        attention(q, k, v, bias=SeparableBias(col=col, row=row), backend="auto").sum().backward()
    assert made == []
    attention(q, k, v, bias=SeparableBias(col=col, row=row), backend="math")
    assert made == [1]


def test_half_precision_and_math_go_dense_and_say_why():
    q, k, _, col, _ = tensors()
    call = AttentionCall.from_tensors(q, k, SeparableBias(col=col))
    assert call.separable_width == 2 and call.has_bias and call.bias_requires_grad
    folded, why = fold_plan("sdpa", call)
    assert why == "" and folded.head_dim == 10 and not folded.has_bias and folded.value_dim in (8, None)
    for dtype in (torch.bfloat16, torch.float16):
        folded, why = fold_plan("sdpa", AttentionCall(**{**call.__dict__, "dtype": dtype}))
        assert folded is None and "would round the bias" in why and "float32" in why
    folded, why = fold_plan("math", call)
    assert folded is None and "reference" in why


def test_bfloat16_attends_with_the_dense_bias():
    """In bf16 the dense c_i - c_j is used (formed in col's float32, then cast): equal to passing that tensor."""
    q, k, v, col, row = tensors(dtype=torch.float32)
    q, k, v = (t.detach().bfloat16() for t in (q, k, v))
    bias = SeparableBias(col=col.detach(), row=row.detach())
    got = attention(q, k, v, bias=bias, backend="sdpa")
    torch.testing.assert_close(got, attention(q, k, v, bias=bias.dense(), backend="sdpa"), atol=0, rtol=0)


def test_float32_fold_keeps_forgetting_attentions_large_terms_exact():
    """c = cumsum(log sigmoid(gate)) over 1024 tokens reaches |c| ~ 10^3, where float32's spacing is 1.2e-4: the
    float32 fold stays within 5e-4 of a float64 reference and within 2x of the float32 dense bias c_i - c_j's error
    (both round c_i and c_j alike; the fold's sum runs in the kernel's float32 dot product)."""
    g = torch.Generator().manual_seed(1)
    B, H, N, D = 1, 2, 1024, 16
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.nn.functional.logsigmoid(torch.randn(B, H, N, generator=g, dtype=torch.float64) - 1).cumsum(-1)
    assert c.abs().max() > 500
    reference = attention(q, k, v, bias=c[..., :, None] - c[..., None, :], backend="math")
    f32 = [t.float() for t in (q, k, v, c)]
    folded = attention(*f32[:3], bias=SeparableBias(row=f32[3], col=-f32[3]), backend="sdpa")
    dense = attention(*f32[:3], bias=f32[3][..., :, None] - f32[3][..., None, :], backend="sdpa")
    folded_error = (folded.double() - reference).abs().max().item()
    dense_error = (dense.double() - reference).abs().max().item()
    assert folded_error < 5e-4 and folded_error < 2 * dense_error, (folded_error, dense_error)


@pytest.mark.parametrize("bad,message", [
    (dict(col=torch.zeros(2, 4, 5)), "SeparableBias.col must be a floating (B or 1, H or 1, 6) tensor"),
    (dict(col=torch.zeros(2, 3, 6)), "H 4"),
    (dict(col=torch.zeros(4, 6)), "got (4, 6) float32 on cpu"),
    (dict(col=None), "SeparableBias.col must be .* got NoneType"),
    (dict(col=torch.zeros(2, 4, 6, device="meta")), "on cpu for q .* got (2, 4, 6) float32 on meta"),
    (dict(col=torch.zeros(2, 4, 6), row=torch.zeros(2, 4, 7)), "SeparableBias.row must be"),
    (dict(col=torch.zeros(2, 4, 6, dtype=torch.long)), "floating"),
])
def test_a_wrong_shape_is_one_value_error(bad, message):
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attention(q, k, v, bias=SeparableBias(**bad), backend="sdpa")


def test_residual_carry_takes_the_separable_bias_dense():
    q, k, _, col, row = tensors()
    bias = SeparableBias(col=col, row=row)
    carried, dense_bias = residual.carry(None, q, k, bias, 0.25, None)
    torch.testing.assert_close(dense_bias, bias.dense())
    logits = 0.25 * torch.einsum("bhgnd,bhmd->bhgnm", q.unflatten(1, (2, 2)), k).flatten(1, 2)
    torch.testing.assert_close(carried, logits + bias.dense())


def test_describe_says_where_a_separable_bias_is_folded(tmp_path, monkeypatch, capsys, isolated_registry):
    (tmp_path / "sep_alibi.py").write_text('''
import torch
from attention_zoo import ProjectedAttention, SeparableBias, register_variant


@register_variant("sep_alibi")
class SeparableALiBi(ProjectedAttention):
    def attention_bias(self, q, k, state, cache):
        slopes = 2.0 ** -torch.arange(1, self.heads + 1, dtype=torch.float32, device=k.device)[None, :, None]  # (1, H, 1)
        keys = torch.arange(k.shape[2], dtype=torch.float32, device=k.device)
        return SeparableBias(row=-slopes * keys[-q.shape[2]:], col=slopes * keys), {}
''')
    (tmp_path / "run.yaml").write_text("plugins: [sep_alibi]\nmodel: {dim: 32, depth: 1, heads: 4, max_seq_len: 16, "
                                       "attention: {variant: sep_alibi, kv_heads: 2}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["describe", str(tmp_path / "run.yaml"), "--train"]) == 0
    out = capsys.readouterr().out
    assert "bias separable, constant): sdpa (separable bias folded into q/k: head dim 8 -> 10)" in out
    assert main(["describe", str(tmp_path / "run.yaml"), "--dtype", "bfloat16"]) == 0
    assert "separable bias made dense: in bfloat16" in capsys.readouterr().out


def test_describe_says_a_residual_stack_carries_a_separable_bias_dense(tmp_path, monkeypatch, capsys,
                                                                         isolated_registry):
    """RealFormer's R_l = L_l + bias_l + R_{l-1} takes a separable bias in as the dense (B, H, N, N) tensor it is:
    every layer from the first then pays for R dense, and describe says so and why (it said "bias constant")."""
    (tmp_path / "sep_res.py").write_text('''
import torch
from attention_zoo import ProjectedAttention, SeparableBias, register_variant


@register_variant("sep_res")
class SeparableResidual(ProjectedAttention):
    carry_residual = True

    def attention_bias(self, q, k, state, cache):
        keys = torch.arange(k.shape[2], dtype=torch.float32, device=k.device)
        return SeparableBias(row=-0.5 * keys[-q.shape[2]:], col=0.5 * keys), {}
''')
    (tmp_path / "run.yaml").write_text("plugins: [sep_res]\nmodel: {dim: 32, depth: 2, heads: 4, max_seq_len: 16, "
                                       "attention: {variant: sep_res}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["describe", str(tmp_path / "run.yaml")]) == 0
    layers = capsys.readouterr().out.split("\nlayer ")[1:]
    assert len(layers) == 2
    assert "residual scores R carried as a dense (B, H, N, N) tensor: a layer added a separable bias" in layers[0]
    assert "residual scores R carried as a dense (B, H, N, N) tensor:" in layers[1]


def test_separable_alibi_equals_the_dense_alibi_in_a_layer():
    """ALiBi -m (i - j) written as row -m i and col m j gives the layer output of the dense bias (float64)."""
    from attention_zoo.variant import LayerShape, ProjectedAttention

    slopes = torch.tensor([0.5, 0.25, 0.125, 1 / 16], dtype=torch.float64)[None, :, None]

    class Dense(ProjectedAttention):
        def attention_bias(self, q, k, state, cache):
            i = torch.arange(q.shape[2], dtype=torch.float64)[:, None]
            j = torch.arange(k.shape[2], dtype=torch.float64)[None, :]
            return -slopes[..., None] * (i - j), {}

    class Separable(ProjectedAttention):
        def attention_bias(self, q, k, state, cache):
            pos = torch.arange(k.shape[2], dtype=torch.float64)
            return SeparableBias(row=-slopes * pos, col=slopes * pos), {}

    torch.manual_seed(0)
    shape = LayerShape(dim=16, heads=4, head_dim=4)
    dense, separable = Dense(shape, kv_heads=2).double(), Separable(shape, kv_heads=2).double()
    separable.load_state_dict(dense.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(separable(x, {})[0], dense(x, {})[0], atol=1e-12, rtol=0)
    assert math.isclose(separable.scale, 0.5)


def test_a_backend_with_its_own_separable_attention_reads_the_bias_whole(triton_backend, monkeypatch):
    """Named triton (its interpreter here) gets the SeparableBias itself: neither folded nor made dense; the result
    matches the formula. describe says so."""
    from attention_zoo.backends import BACKENDS

    monkeypatch.setattr("attention_zoo.backends.fold", lambda *a, **k: pytest.fail("folded"))
    monkeypatch.setattr(SeparableBias, "dense", lambda *a, **k: pytest.fail("made dense"))
    q, k, v, col, row = (t.detach().float().requires_grad_() if t is not None else None
                         for t in tensors(B=1, H=4, Hkv=2, Nq=20, Nk=20, D=16))
    got = attention(q, k, v, bias=SeparableBias(col=col, row=row), backend="triton")
    want = naive(*(t.detach().double() for t in (q, k, v, row, col)), 0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    call = AttentionCall.from_tensors(q, k, SeparableBias(col=col))
    from attention_zoo.commands.inspect_config import _plan

    assert _plan("triton", call)[0] == "triton (separable bias read by its kernels)"
    assert BACKENDS.get("triton").separable_attention is not None


def test_a_backend_that_wants_equal_widths_gets_v_padded(monkeypatch):
    """Where the backend cannot take v narrower than the folded q/k (sdpa off CPU, or without the CPU kernel), v is
    zero-padded to D + G and the output sliced back: the same result, outputs and gradients (float64)."""
    from attention_zoo.backends import BACKENDS

    sdpa = BACKENDS.get("sdpa")
    monkeypatch.setattr(sdpa, "fuses_unequal_value_dim", lambda device: False)
    widths = []
    real = sdpa.attention
    monkeypatch.setattr(sdpa, "attention", lambda q, k, v, **kw: widths.append((q.shape[-1], v.shape[-1])) or real(q, k, v, **kw))
    q, k, v, col, row = tensors(H=4, Hkv=2)
    got = attention(q, k, v, bias=SeparableBias(col=col, row=row), backend="sdpa", scale=0.3)
    assert widths == [(10, 10)] and got.shape == (2, 4, 6, 8)
    expected = naive(q, k, v, row, col, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), [k, v, col]), torch.autograd.grad(expected.sum(), [k, v, col])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_decoding_takes_the_dense_bias_prefill_folds():
    """One query against a cache: a (B, H, 1, Nk) bias costs less than copying k with its folded columns, so it
    goes dense; a prompt's worth of queries folds."""
    q, k, _, col, _ = tensors(B=1, H=4, Hkv=2, Nq=1, Nk=64, D=8)
    folded, why = fold_plan("sdpa", AttentionCall.from_tensors(q, k, SeparableBias(col=col)))
    assert folded is None and "decoding" in why
    q, k, _, col, _ = tensors(B=1, H=4, Hkv=2, Nq=64, Nk=64, D=8)
    assert fold_plan("sdpa", AttentionCall.from_tensors(q, k, SeparableBias(col=col)))[0] is not None
    q, k, _, col, _ = tensors(B=1, H=4, Hkv=1, Nq=6, Nk=12, D=8)  # a cached chunk, as in the formula test
    assert fold_plan("sdpa", AttentionCall.from_tensors(q, k, SeparableBias(col=col)))[0] is not None


def test_a_masked_key_stays_masked_when_folded():
    """col_j = -inf masks key j. Folded with GQA, the one-hot selector's zeros times -inf were NaN (output and every
    gradient); -inf is folded as the dtype's most negative number: the result is the dense bias's, gradients too."""
    q, k, v, col, _ = tensors(B=1, H=4, Hkv=2, Nq=8, Nk=8)
    masked = col.detach().clone()
    masked[:, :, 1] = float("-inf")
    masked[:, 2, 5] = float("-inf")
    masked.requires_grad_()
    got = attention(q, k, v, bias=SeparableBias(col=masked), backend="sdpa")
    want = attention(q, k, v, bias=SeparableBias(col=masked), backend="math")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    grads = torch.autograd.grad(got.sum(), [q, k, v, masked])
    for a, b in zip(grads, torch.autograd.grad(want.sum(), [q, k, v, masked])):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_off_cpu_the_folded_head_dim_is_a_multiple_of_8():
    """GPU kernels want q/k widths in multiples of 8 (SDPA's float32 memory-efficient kernel: of 4; otherwise it runs
    its math kernel, (B, H, Nq, Nk) scores): the fold pads with zero columns, which change nothing."""
    q, k, v, col, row = tensors(H=4, Hkv=2, D=8)
    call = AttentionCall.from_tensors(q, k, SeparableBias(col=col))
    cuda = dataclasses.replace(call, device="cuda", q_len=64, k_len=64)
    folded, why = fold_plan("sdpa", cuda)
    assert why == "" and folded.head_dim == 16 and folded.value_dim is None  # 8 + 2 -> 16; v padded on CUDA sdpa
    q2, k2 = fold(q, k, SeparableBias(col=col), 0.3, head_dim=16)
    assert q2.shape[-1] == k2.shape[-1] == 16 and (q2[..., 10:] == 0).all() and (k2[..., 10:] == 0).all()
    pv = torch.nn.functional.pad(v, (0, 8))
    got = attention(q2, k2, pv, backend="sdpa", scale=1.0)[..., :8]
    torch.testing.assert_close(got, naive(q, k, v, None, col, 0.3), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="below the folded width 8 \\+ 2"):
        fold(q, k, SeparableBias(col=col), 0.3, head_dim=9)


@pytest.mark.parametrize("scale", [0.0, 1e-40, -0.5])
def test_any_scale_folds(scale):
    """The scale goes into q, not a 1/scale selector: scale 0 (attention by the bias alone) and a scale whose inverse
    overflows float32 gave NaN."""
    q, k, v, col, _ = tensors(B=1, H=4, Hkv=2, Nq=8, Nk=8, dtype=torch.float32)
    got = attention(q, k, v, bias=SeparableBias(col=col), backend="sdpa", scale=scale)
    want = attention(q, k, v, bias=SeparableBias(col=col), backend="math", scale=scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_value_wider_than_the_folded_keys_is_kept_whole(monkeypatch):
    """Differential attention's v (D) is wider than its q/k halves (D / 2) plus the folded columns: on a backend that
    wants equal widths, q' and k' are zero-padded to v's width (v was cropped to theirs: a wrong-width output)."""
    from attention_zoo.backends import BACKENDS

    monkeypatch.setattr(BACKENDS.get("sdpa"), "fuses_unequal_value_dim", lambda device: False)
    q, k, _, col, row = tensors(H=4, Hkv=2, D=8)
    v = torch.randn(2, 2, 6, 32, dtype=torch.float64, requires_grad=True)
    from attention_zoo.backends import dispatch  # functional.attention wants v as wide as q and k; layers do not

    got = dispatch(q, k, v, bias=SeparableBias(col=col, row=row), causal=True, scale=0.3, backend="sdpa")
    assert got.shape == (2, 4, 6, 32)
    expected = naive(q, k, v, row, col, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), [q, v, col]), torch.autograd.grad(expected.sum(), [q, v, col])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("Nq,Nk", [(8, 8), (3, 8)])
def test_a_query_whose_every_key_is_masked_gets_zero(Nq, Nk):
    """col = -inf on keys 0..2 (and on every key for head 1): the queries that see only those keys get 0, as the
    dense bias gives (a row that sees no key); the folded kernel alone would average the masked keys' values."""
    q, k, v, col, _ = tensors(B=2, H=4, Hkv=2, Nq=Nq, Nk=Nk)
    masked = col.detach().clone()
    masked[..., :3] = float("-inf")
    masked[:, 1] = float("-inf")
    masked.requires_grad_()
    got = attention(q, k, v, bias=SeparableBias(col=masked), backend="sdpa")
    want = attention(q, k, v, bias=SeparableBias(col=masked), backend="math")
    assert (want[:, 1] == 0).all() and (want[:, :, : max(0, 3 - (Nk - Nq))] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), [q, k, v, masked]), torch.autograd.grad(want.sum(), [q, k, v, masked])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
