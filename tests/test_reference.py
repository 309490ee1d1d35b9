"""Every built-in variant against a naive reference written here from the equations (selective attention:
Leviathan, Kalman, Matias, ICLR 2025, section 3; residual attention: RealFormer, He et al. 2021).

The reference never imports attention_zoo.functional or the backends: it loops over heads, repeats
k/v with repeat_interleave, and builds the selection penalty F with Python loops over queries i and
earlier queries k < i. It is compared with the library on outputs and gradients:

- fp32: |difference| <= 1e-5 * max(1, largest |value|) (outputs and each gradient separately); in the stack
  tests against the reference run in float64 on a float64 copy of the model, so that only the library's fp32
  rounding counts (against an fp32 reference the two roundings add up: the library's and the loops' own,
  each 2-9e-6 in a three-layer stack's gradients). One stated exception: differential attention's lambda
  gradients in fp32, 3e-5. Each is one sum over every batch element, position, head and channel of
  dout . (attention output), with heavy cancellation: against float64 the fused CPU kernel gives 1.4e-5 there
  (6e-6 elsewhere in the same model), SDPA's math path 5.8e-6, the kernel with the C library's exp 1.9e-5:
  rounding order, not a wrong value;
- float64: the same with 1e-10.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as tF

import attention_zoo.variant as variant_module
from attention_zoo import build_model, create_variant, functional
from attention_zoo.ops.residual import scores_tensor
from attention_zoo.ops.selection import Selection, penalty_tensor
from attention_zoo.state import RESIDUAL_SCORES, SELECTION_PENALTY
from tests.cases import randomized

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
R_KEY, F_KEY = RESIDUAL_SCORES.name, SELECTION_PENALTY.name


def assert_matches(actual, expected, dtype, what="", tol=None):
    scale = max(1.0, expected.detach().abs().max().item())
    atol = (tol or TOL[dtype]) * scale
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")



# ---------------------------------------------------------------------------------------------------
# The naive reference, from the papers' equations.

def ref_logits(q, k):
    """L^h[i, j] = q^h_i . k^{g(h)}_j / sqrt(D), one head at a time; k repeated to H heads."""
    H, D = q.shape[1], q.shape[-1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    return torch.stack([q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(D) for h in range(H)], dim=1)


def ref_softmax_attend(scores, v):
    """softmax(scores + causal mask) v per head; scores (B, H, N, N), v (B, Hkv, N, D)."""
    H, N = scores.shape[1], scores.shape[-1]
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    visible = torch.ones(N, N, dtype=torch.bool).tril()
    outs = []
    for h in range(H):
        weights = torch.softmax(scores[:, h].masked_fill(~visible, float("-inf")), dim=-1)
        outs.append(weights @ v[:, h])
    return torch.stack(outs, dim=1)


def ref_penalty(selection_logits, protect_bos=True):
    """F[i, j] = sum_{k < i} S[k, j], S = ReLU(L^s) with S[k, j] = 0 for j >= k and, if protected, j == 0."""
    B, N, _ = selection_logits.shape
    zero = selection_logits.new_zeros(B)

    def S(k, j):
        if j >= k or (protect_bos and j == 0):
            return zero
        return torch.relu(selection_logits[:, k, j])

    rows = []
    for i in range(N):
        rows.append(torch.stack([sum((S(k, j) for k in range(i)), zero) for j in range(N)], dim=-1))
    return torch.stack(rows, dim=1)


def ref_selective(q, k, v, selection_head=0, protect_bos=True):
    L = ref_logits(q, k)
    Fpen = ref_penalty(L[:, selection_head], protect_bos)
    return ref_softmax_attend(L - Fpen[:, None], v), Fpen


# ---------------------------------------------------------------------------------------------------
# The functional API against the reference.

def qkv(H=4, Hkv=4, N=8, D=8, B=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    def make(h):
        return torch.randn(B, h, N, D, generator=g, dtype=dtype).requires_grad_()
    return make(H), make(Hkv), make(Hkv)


def grads(out, inputs, seed=3):
    # drawn in float64 and cast: a float32 and a float64 run of one model get the same weights
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_reference(kv_heads, backend, dtype):
    q, k, v = qkv(Hkv=kv_heads, dtype=dtype)
    out = functional.attention(q, k, v, backend=backend)
    ref = ref_softmax_attend(ref_logits(q, k), v)
    assert_matches(out, ref, dtype, "output")
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_matches(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("layout", ["per-head", "one-head", "expanded"])
def test_attention_with_a_trainable_bias_matches_reference(layout, kv_heads, backend):
    """A bias per head, one broadcast over heads, or one expanded with stride 0: outputs and d(bias)."""
    q, k, v = qkv(Hkv=kv_heads, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    heads = 4 if layout == "per-head" else 1
    base = torch.randn(2, heads, 8, 8, generator=g, dtype=torch.float64).requires_grad_()
    bias = base.expand(-1, 4, -1, -1) if layout == "expanded" else base
    out = functional.attention(q, k, v, bias=bias, backend=backend)
    ref = ref_softmax_attend(ref_logits(q, k) + bias.expand(-1, 4, -1, -1), v)
    assert_matches(out, ref, torch.float64, "output")
    for name, got, want in zip(["q", "k", "v", "bias"], grads(out, (q, k, v, base)), grads(ref, (q, k, v, base))):
        assert_matches(got, want, torch.float64, f"grad {name}")


def test_gqa_equals_mha_with_kv_repeated():
    q, k, v = qkv(Hkv=2)
    grouped = functional.attention(q, k, v, backend="math")
    repeated = functional.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), backend="math")
    torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=0)


def test_gqa_model_equals_mha_model_with_kv_weights_repeated():
    config = {"backend": "math", "model": {"vocab_size": 32, "dim": 32, "depth": 2, "heads": 4, "max_seq_len": 16}}
    gqa = build_model({**config, "model": {**config["model"], "attention": {"variant": "gqa", "kv_heads": 2}}})
    mha = build_model({**config, "model": {**config["model"], "attention": {"variant": "vanilla"}}})
    state = dict(gqa.state_dict())
    for name, w in gqa.state_dict().items():
        if name.endswith("kv_proj.weight"):  # rows laid out (k|v, kv head, head_dim)
            state[name] = w.view(2, 2, 8, 32).repeat_interleave(2, dim=1).reshape(2 * 4 * 8, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("kv_heads,selection_head,protect_bos",
                         [(4, 0, True), (4, 2, False), (2, 2, True), (2, 1, True), (1, 3, True)])
def test_selective_attention_matches_reference(kv_heads, selection_head, protect_bos, backend, dtype):
    q, k, v = qkv(Hkv=kv_heads, dtype=dtype)
    out = functional.selective_attention(q, k, v, selection_head=selection_head, protect_bos=protect_bos, backend=backend)
    ref, _ = ref_selective(q, k, v, selection_head, protect_bos)
    assert_matches(out, ref, dtype, "output")
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert_matches(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("protect_bos", [True, False])
def test_selection_penalty_matches_loops(protect_bos, dtype):
    logits = torch.randn(2, 9, 9, dtype=dtype, generator=torch.Generator().manual_seed(4))
    Fpen = functional.selection_penalty(logits, protect_bos=protect_bos)
    assert Fpen.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches(Fpen, ref_penalty(logits, protect_bos), dtype)


def test_selection_penalty_is_float32_for_half_logits():
    logits = torch.randn(1, 6, 6).to(torch.bfloat16)
    assert functional.selection_penalty(logits).dtype == torch.float32


def test_selection_scores_never_mask_bos_self_or_future():
    logits = 1.0 + torch.rand(2, 7, 7)  # every raw score positive, so only the rules can zero one
    S = functional.selection_scores(logits)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert (S[:, :, 0] == 0).all(), "S[i, 0] must be 0: BOS is never masked"
    assert (S[:, i == j] == 0).all(), "S[i, i] must be 0: a token never masks itself"
    assert (S[:, j > i] == 0).all(), "future keys carry no score"
    allowed = (j < i) & (j > 0)
    torch.testing.assert_close(S[:, allowed], logits[:, allowed])
    assert (functional.selection_scores(logits, protect_bos=False)[:, 1:, 0] > 0).all()


def test_penalty_is_an_exclusive_cumsum_along_queries_not_keys():
    """One positive score S[k=3, j=1]: exactly the later queries i > 3 are penalised at key 1.

    A cumsum along keys would instead penalise query 3 at keys > 1; an inclusive cumsum would include i = 3.
    """
    logits = torch.full((1, 6, 6), -1.0)
    logits[0, 3, 1] = 2.0
    expected = torch.zeros(1, 6, 6)
    expected[0, 4:, 1] = 2.0
    torch.testing.assert_close(functional.selection_penalty(logits), expected, atol=0, rtol=0)


def test_penalty_never_decreases_along_queries_and_spares_bos_and_self():
    q, k, v = qkv(N=10)
    Fpen = functional.selection_penalty(functional.selection_logits(q, k, 0))
    assert (Fpen[:, 1:] >= Fpen[:, :-1]).all(), "F must be non-decreasing along queries"
    assert (Fpen[:, :, 0] == 0).all() and (torch.diagonal(Fpen, dim1=1, dim2=2) == 0).all()
    assert (Fpen > 0).any()


def test_selective_gqa_selection_head_reads_its_kv_head():
    q, k, _ = qkv(H=4, Hkv=2)
    for s in range(4):  # g(s) = s // (H / Hkv): heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
        got = functional.selection_logits(q, k, selection_head=s)
        torch.testing.assert_close(got, q[:, s] @ k[:, s // 2].transpose(-1, -2) / math.sqrt(8))


def test_gradient_flows_into_the_selection_head_through_F():
    """Heads other than the selection head depend on its q and k only through F: those gradients must exist."""
    q, k, v = qkv()  # one kv head per query head, so k[:, 1] is the selection head's alone
    out = functional.selective_attention(q, k, v, selection_head=1, backend="math")
    g_q, g_k = grads(out[:, [0, 2, 3]], (q, k))
    ref, _ = ref_selective(q, k, v, selection_head=1)
    want_q, want_k = grads(ref[:, [0, 2, 3]], (q, k))
    assert g_q[:, 1].abs().max() > 1e-3, "F is detached: the selection head's q learns nothing from the heads it masks"
    assert g_k[:, 1].abs().max() > 1e-3, "F is detached: the selection head's k learns nothing from the heads it masks"
    assert_matches(g_q, want_q, torch.float32, "grad q")
    assert_matches(g_k, want_k, torch.float32, "grad k")


# ---------------------------------------------------------------------------------------------------
# Whole stacks against a reference stack that reuses the model's weights.

VOCAB, DIM, HEADS, N, B = 32, 32, 4, 8, 2
EPS = 1e-5

# The stacks every case runs on: Llama's (the default), GPT-2's, and NoPE with a tanh-GELU MLP.
COMPONENTS = {
    "rope": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "rope_theta": 100.0},
    "learned": {"position": "learned", "norm": "layernorm", "mlp": "gelu"},
    "none": {"position": "none", "norm": "rmsnorm", "mlp": "gelu_tanh"},
}


def ref_rope(x, theta):
    """RoFormer's rotation in complex form, pairing dimension i with i + D/2 (the rotate-half convention):
    (x_i + 1j x_{i+D/2}) * exp(1j * position * theta^(-2i/D)). x: (B, H, N, D) at positions 0..N-1."""
    D, n = x.shape[-1], x.shape[-2]
    angle = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def ref_rmsnorm(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * weight


def ref_norm(kind, x, module):
    if kind == "rmsnorm":
        return ref_rmsnorm(x, module.weight)
    return tF.layer_norm(x, (x.shape[-1],), module.weight, module.bias, eps=EPS)


def ref_mlp(kind, h, mlp):
    if kind == "swiglu":
        gate = h @ mlp.gate.weight.T
        return (gate * torch.sigmoid(gate) * (h @ mlp.up.weight.T)) @ mlp.down.weight.T
    return tF.gelu(h @ mlp.up.weight.T, approximate="tanh" if kind == "gelu_tanh" else "none") @ mlp.down.weight.T


def ref_differential(q, k, v, a, index, depth_index, theta=None):
    """Ye et al. 2025: (softmax(Q1 K1^T/sqrt(d)) - lambda softmax(Q2 K2^T/sqrt(d))) V per head, RMSNorm, * (1 - lambda_init).
    q, k: projected (QK-normalised) but not rotated; with `theta` (RoPE) each half Q_s, K_s is rotated as a head
    of width d, as the paper's code rotates its 2H heads of width d."""
    d = q.shape[-1] // 2
    init = 0.8 - 0.6 * math.exp(-0.3 * depth_index)  # layer l = depth_index + 1
    lam = torch.exp((a.lambda_q1 * a.lambda_k1).sum()) - torch.exp((a.lambda_q2 * a.lambda_k2).sum()) + init
    maps = []
    for s in (0, 1):
        qs, ks = q[..., s * d:(s + 1) * d], k[..., s * d:(s + 1) * d]
        if theta is not None:
            qs, ks = ref_rope(qs, theta), ref_rope(ks, theta)
        maps.append(ref_softmax_attend(ref_logits(qs, ks), v))
    return ref_rmsnorm(maps[0] - lam * maps[1], a.head_norm.weight) * (1 - init)


def reference_lm(model, tokens, layers, components=COMPONENTS["rope"]):
    """The CausalLM forward written out (pre-norm blocks), attention from the equations.

    layers: (variant, params) per layer. Returns logits and, per layer, its logits L, penalty F, carried R.
    """
    x = model.token_embedding.weight[tokens]
    if components["position"] == "learned":
        x = x + model.position_embedding.weight[: tokens.shape[1]]
    norm, mlp = components["norm"], components["mlp"]
    R = F_latest = None  # what the state channels hold so far
    trace = []
    for index, (block, (name, params)) in enumerate(zip(model.blocks, layers)):
        a = block.attention
        h = ref_norm(norm, x, block.norm_attn)
        Hkv = params.get("kv_heads") or HEADS
        q = (h @ a.q_proj.weight.T).view(B, -1, HEADS, DIM // HEADS).transpose(1, 2)
        kv = (h @ a.kv_proj.weight.T).view(B, -1, 2, Hkv, DIM // HEADS)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if params.get("qk_norm"):  # before the rotation
            q, k = ref_rmsnorm(q, a.q_norm.weight), ref_rmsnorm(k, a.k_norm.weight)
        unrotated = q, k  # differential rotates each half of a head on its own
        if components["position"] == "rope":
            q, k = ref_rope(q, components["rope_theta"]), ref_rope(k, components["rope_theta"])
        L = ref_logits(q, k)
        own = Fl = None
        if name in ("selective", "cross_layer_selective"):
            s, bos = params.get("selection_head", 0), params.get("protect_bos", True)
            is_source = name == "selective" or index in params.get("sources", [0])
            own = ref_penalty(L[:, s], bos) if is_source else None
            if params.get("mode") == "accumulate":
                previous = 0 if F_latest is None else params.get("decay", 1.0) * F_latest
                Fl = None if own is None and F_latest is None else (0 if own is None else own) + previous
            else:
                Fl = own if own is not None else F_latest
        scores = L if Fl is None else L - Fl[:, None]
        if name == "residual" or params.get("residual"):
            scores = scores if R is None else scores + R
            R = scores
        if own is not None or params.get("mode") == "accumulate":
            F_latest = Fl
        trace.append({"L": L, "F": Fl, "R": R})
        theta = components["rope_theta"] if components["position"] == "rope" else None
        heads_out = (ref_differential(*unrotated, v, a, index, index, theta) if name == "differential"
                     else ref_softmax_attend(scores, v))
        x = x + heads_out.transpose(1, 2).reshape(B, -1, DIM) @ a.out_proj.weight.T
        x = x + ref_mlp(mlp, ref_norm(norm, x, block.norm_mlp), block.mlp)
    x = ref_norm(norm, x, model.norm)
    return x @ model.lm_head.weight.T, trace


def stack(attention, depth=3, layers=(), backend="math", dtype=torch.float32, seed=0, components="rope"):
    """A model with weights large enough for F to matter, and its per-layer (variant, params)."""
    config = {"backend": backend, "model": {"vocab_size": VOCAB, "dim": DIM, "depth": depth, "heads": HEADS,
                                            "max_seq_len": 16, "attention": attention, "layers": list(layers),
                                            **COMPONENTS[components]}}
    model = build_model(config).to(dtype)
    randomized(model, seed, std=0.2)
    from attention_zoo.config import layer_specs
    return model, [(s.variant, s.params) for s in layer_specs(model.config["model"])]


STACKS = {
    "vanilla": ({"variant": "vanilla"}, []),
    "vanilla-qk_norm": ({"variant": "vanilla", "qk_norm": True}, []),
    "gqa": ({"variant": "gqa", "kv_heads": 2}, []),
    "mqa": ({"variant": "gqa", "kv_heads": 1}, []),
    "residual": ({"variant": "residual"}, []),
    "residual-gqa": ({"variant": "residual", "kv_heads": 2}, []),
    "selective": ({"variant": "selective"}, []),
    "selective-qk_norm-gqa": ({"variant": "selective", "qk_norm": True, "kv_heads": 2}, []),
    "selective-gqa-head1": ({"variant": "selective", "kv_heads": 2, "selection_head": 1}, []),
    "selective-gqa-head2": ({"variant": "selective", "kv_heads": 2, "selection_head": 2}, []),
    "selective-head1-no-bos": ({"variant": "selective", "selection_head": 1, "protect_bos": False}, []),
    "selective-residual": ({"variant": "selective", "residual": True}, []),
    "selective-residual-mqa": ({"variant": "selective", "residual": True, "kv_heads": 1}, []),
    "share": ({"variant": "cross_layer_selective", "sources": [0, 2]}, []),
    "share-residual-gqa": ({"variant": "cross_layer_selective", "sources": [0], "residual": True, "kv_heads": 2}, []),
    "accumulate": ({"variant": "cross_layer_selective", "mode": "accumulate", "sources": [1, 2], "decay": 0.5}, []),
    # decay 0 at a layer that is no source: F_1 = 0, so layer 2 (decay 1) attends with F_2 = F_1 = 0, not F_0
    "accumulate-decay0": ({"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0]},
                          [{"at": [1], "attention": {"variant": "cross_layer_selective", "mode": "accumulate",
                                                     "sources": [0], "decay": 0.0}}]),
    "differential": ({"variant": "differential"}, []),
    "differential-gqa-qk_norm": ({"variant": "differential", "kv_heads": 2, "qk_norm": True}, []),
    "mixed": ({"variant": "selective", "residual": True}, [{"at": [1], "attention": {"variant": "vanilla"}},
                                                          {"at": [2], "attention": {"variant": "differential"}}]),
}
# Every case on every stack in float64 on math (the exactness check) and float32 on sdpa (the fast path).
GRID = [(case, components, backend, dtype) for case in STACKS for components in COMPONENTS
        for backend, dtype in (("math", torch.float64), ("sdpa", torch.float32))]


@pytest.mark.parametrize("case,components,backend,dtype", GRID,
                         ids=[f"{c}-{s}-{b}-{str(d)[6:]}" for c, s, b, d in GRID])
def test_stack_matches_reference(case, components, backend, dtype):
    attention, layers = STACKS[case]
    model, specs = stack(attention, depth=4 if case == "accumulate" else 3, layers=layers, backend=backend,
                         dtype=dtype, components=components)
    tokens = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(1))
    logits, per_layer = model(tokens, return_state=True)
    exact = copy.deepcopy(model).double()  # the reference in float64 on the same weights
    ref, trace = reference_lm(exact, tokens, specs, COMPONENTS[components])
    as_ref = lambda t: t.to(torch.float64)  # noqa: E731
    assert_matches(as_ref(logits), ref, dtype, "logits")
    for index, (updates, expected) in enumerate(zip(per_layer, trace)):
        if F_KEY in updates:
            assert_matches(as_ref(penalty_tensor(updates[F_KEY])), expected["F"], dtype, f"layer {index} F")
        if R_KEY in updates:
            assert_matches(as_ref(scores_tensor(updates[R_KEY])), expected["R"], dtype, f"layer {index} R")
    names, params = zip(*model.named_parameters())
    for name, got, want in zip(names, grads(logits, params), grads(ref, list(exact.parameters()))):
        ill_conditioned = dtype == torch.float32 and ".lambda_" in name  # see the module docstring
        assert_matches(as_ref(got), want, dtype, f"grad {name}", tol=3e-5 if ill_conditioned else None)


def test_residual_layer0_equals_vanilla():
    residual = create_variant("residual", dim=DIM, heads=HEADS, backend="math")
    vanilla = create_variant("vanilla", dim=DIM, heads=HEADS, backend="math")
    vanilla.load_state_dict(residual.state_dict())
    x = torch.randn(B, N, DIM)
    y, updates = residual(x, {})
    torch.testing.assert_close(y, vanilla(x, {})[0], atol=0, rtol=0)
    q = residual.q_proj(x).view(B, N, HEADS, -1).transpose(1, 2)
    k = residual.kv_proj(x).view(B, N, 2, HEADS, -1)[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(scores_tensor(updates[R_KEY]), ref_logits(q, k), atol=1e-6, rtol=0)  # R_0 = L_0


@pytest.mark.parametrize("variant", [{"variant": "residual"}, {"variant": "selective", "residual": True}])
def test_residual_carries_the_sum_of_earlier_scores(variant):
    """R_l = L_l + R_{l-1}, and with selective R_l = L_l - F_l + R_{l-1}: read from what layers wrote."""
    model, specs = stack(variant, depth=3)
    tokens = torch.randint(0, VOCAB, (B, N))
    _, per_layer = model(tokens, return_state=True)
    _, trace = reference_lm(model, tokens, specs)
    previous = 0
    for updates, expected in zip(per_layer, trace):
        own = expected["L"] - (0 if expected["F"] is None else expected["F"][:, None])
        assert_matches(scores_tensor(updates[R_KEY]), own + previous, torch.float32)
        previous = scores_tensor(updates[R_KEY])


def test_another_selection_head_changes_F():
    penalties = []
    for head in (0, 1):
        model, specs = stack({"variant": "selective", "selection_head": head}, depth=1, seed=5)
        tokens = torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(2))
        _, per_layer = model(tokens, return_state=True)
        penalties.append(penalty_tensor(per_layer[0][F_KEY]))
        assert_matches(penalties[-1], reference_lm(model, tokens, specs)[1][0]["F"], torch.float32)
    assert (penalties[0] - penalties[1]).abs().max() > 1e-2


def test_stack_penalty_properties():
    model, _ = stack({"variant": "selective"}, depth=3)
    _, per_layer = model(torch.randint(0, VOCAB, (B, N)), return_state=True)
    for updates in per_layer:
        assert isinstance(updates[F_KEY], Selection)  # structured: no (B, N, N) unless asked for
        Fpen = updates[F_KEY].dense()
        assert Fpen.dtype == torch.float32 and Fpen.shape == (B, N, N)  # one tensor for all heads
        assert (Fpen[:, 1:] >= Fpen[:, :-1]).all()
        assert (Fpen[:, :, 0] == 0).all() and (torch.diagonal(Fpen, dim1=1, dim2=2) == 0).all()


@pytest.fixture
def selection_calls(monkeypatch):
    """Counts, per layer, the selection heads a layer defines (`Selection.of_head`: the only way a built-in
    layer asks for selection logits to be computed)."""
    calls: list[int] = []
    current = [-1]
    original = Selection.of_head.__func__

    def count(cls, *args, **kwargs):
        calls.append(current[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Selection, "of_head", classmethod(count))

    def track(model):
        for index, block in enumerate(model.blocks):
            block.attention.register_forward_pre_hook(lambda mod, args, index=index: current.__setitem__(0, index))
        return calls

    return track


@pytest.fixture
def biases(monkeypatch):
    """The bias each attention layer hands to the backend, in layer order."""
    seen = []
    original = variant_module.dispatch

    def recording(q, k, v, *, bias, **kwargs):
        seen.append(bias)
        return original(q, k, v, bias=bias, **kwargs)

    monkeypatch.setattr(variant_module, "dispatch", recording)
    return seen


def test_share_reuses_the_source_F_exactly_and_computes_no_selection_elsewhere(selection_calls, biases):
    model, specs = stack({"variant": "cross_layer_selective", "sources": [0, 2]}, depth=4)
    calls = selection_calls(model)
    tokens = torch.randint(0, VOCAB, (B, N))
    _, per_layer = model(tokens, return_state=True)
    assert calls == [0, 2], "only source layers may compute selection logits"
    assert F_KEY in per_layer[0] and F_KEY in per_layer[2]
    assert F_KEY not in per_layer[1] and F_KEY not in per_layer[3], "a sharing layer writes nothing new"
    for layer, source in [(1, 0), (3, 2)]:
        assert biases[layer] is per_layer[source][F_KEY]  # the source's very selection, nothing recomputed
    _, trace = reference_lm(model, tokens, specs)
    assert_matches(per_layer[0][F_KEY].dense(), trace[0]["F"], torch.float32)
    assert_matches(per_layer[2][F_KEY].dense(), trace[2]["F"], torch.float32)


@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_accumulate_matches_its_formula(decay, selection_calls):
    """F_l = own_l + decay * F_{l-1}; own_l is the layer's selective F at sources and 0 elsewhere."""
    sources = [1, 2]
    model, specs = stack({"variant": "cross_layer_selective", "mode": "accumulate", "sources": sources, "decay": decay}, depth=4)
    calls = selection_calls(model)
    tokens = torch.randint(0, VOCAB, (B, N))
    _, per_layer = model(tokens, return_state=True)
    assert calls == sources
    _, trace = reference_lm(model, tokens, specs)
    assert F_KEY not in per_layer[0], "no source at or below layer 0: nothing to accumulate yet"
    previous = torch.zeros(B, N, N)
    for layer in range(1, 4):
        own = ref_penalty(trace[layer]["L"][:, 0]) if layer in sources else 0
        assert_matches(per_layer[layer][F_KEY].dense(), own + decay * previous, torch.float32, f"layer {layer}")
        previous = per_layer[layer][F_KEY].dense()
