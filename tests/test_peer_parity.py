"""Our stack against x-transformers 2.31.10 (the peer `bench --peer` measures) on the same weights.

A second, independent implementation of the same papers: rotary positions, RMSNorm, SwiGLU, grouped-query
attention, RealFormer's residual scores and selective attention (x-transformers' `attn_selective`, written from
the paper's section 3.3). Our weights are copied into the peer's model and the logits, and the gradient they
send to the token embeddings (through every layer), are compared in float64:
|difference| <= 1e-7 * max(1, largest |value|) (selective attention and residual scores keep their F and R in
float32 whatever the compute dtype, so about 1e-8 is left there; the other paths agree to 1e-10).

What the copy has to translate, each a convention and not a difference in the model:
- rotary pairs: ours rotates dimension i with i + D/2 (rotate-half, as Llama); x-transformers rotates 2i with
  2i + 1 at the same frequency: q and k rows are interleaved;
- GQA groups: our query head g * G + r reads kv head g (as SDPA's enable_gqa and transformers); the peer's
  head r * Hkv + g does: q rows and out-projection columns are permuted by head;
- x-transformers stores RMSNorm's gain as gain - 1 (`unit_offset`), normalises with F.normalize (eps 1e-12
  on the norm; ours is set to 1e-30 on the mean square), scales tied logits by dim^-0.5 unless told
  (`tie_embedding_scale=1`), and gives its GLU projection a bias (zeroed); its SwiGLU projection is
  [up, gate], hidden int(8/3 dim) (ours is given the same width).
"""
from __future__ import annotations

import pytest
import torch

from attention_zoo import build_model
from attention_zoo.bench.points import VariantSpec, peer_kwargs, peer_stack

x_transformers = pytest.importorskip("x_transformers")

DIM, HEADS, HEAD_DIM, DEPTH, VOCAB, LENGTH = 64, 4, 32, 3, 97, 24


def models(attention: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, the peer) in float64 with the same weights; norm gains drawn away from 1 so a wrong gain shows."""
    torch.manual_seed(0)
    ours = build_model({"model": {"vocab_size": VOCAB, "dim": DIM, "depth": DEPTH, "heads": HEADS, "head_dim": HEAD_DIM,
                                  "max_seq_len": 64, "mlp_hidden": int(DIM * 8 / 3), "norm_eps": 1e-30,
                                  "attention": attention}}).double()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs, _ = peer_kwargs(VariantSpec(attention["variant"], attention), DEPTH)
    wrapper, decoder = peer_stack({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}, HEAD_DIM)
    peer = x_transformers.TransformerWrapper(
        num_tokens=VOCAB, max_seq_len=64, tie_embedding=True, tie_embedding_scale=1.0, **wrapper,
        attn_layers=x_transformers.Decoder(dim=DIM, depth=DEPTH, heads=HEADS, attn_dim_head=HEAD_DIM, **decoder,
                                           **kwargs)).double()
    peer.load_state_dict(peer_state(ours, peer))
    return ours, peer


def peer_state(ours: torch.nn.Module, peer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the peer's names, translated as the module docstring says."""
    kv_heads = ours.blocks[0].attention.kv_heads
    group = HEADS // kv_heads
    peer_order = torch.tensor([g * group + r for r in range(group) for g in range(kv_heads)])  # peer head -> ours

    def interleave_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:  # (heads * D, dim): rows i, i + D/2 -> 2i, 2i+1
        return w.view(heads, 2, HEAD_DIM // 2, -1).transpose(1, 2).reshape(heads * HEAD_DIM, -1)

    state = {"token_emb.emb.weight": ours.token_embedding.weight, "attn_layers.final_norm.g": ours.norm.weight}
    for i, block in enumerate(ours.blocks):
        attn, mlp = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        k, v = block.attention.kv_proj.weight.chunk(2)
        q = block.attention.q_proj.weight.view(HEADS, HEAD_DIM, DIM)[peer_order].reshape(HEADS * HEAD_DIM, DIM)
        out = block.attention.out_proj.weight.view(DIM, HEADS, HEAD_DIM)[:, peer_order].reshape(DIM, -1)
        up = torch.cat([block.mlp.up.weight, block.mlp.gate.weight])
        state |= {f"{attn}.0.0.g": block.norm_attn.weight, f"{attn}.1.to_q.weight": interleave_rotary(q, HEADS),
                  f"{attn}.1.to_k.weight": interleave_rotary(k, kv_heads), f"{attn}.1.to_v.weight": v,
                  f"{attn}.1.to_out.weight": out, f"{mlp}.0.0.g": block.norm_mlp.weight,
                  f"{mlp}.1.ff.0.proj.weight": up, f"{mlp}.1.ff.0.proj.bias": torch.zeros(len(up), dtype=up.dtype),
                  f"{mlp}.1.ff.2.weight": block.mlp.down.weight}
    for name, module in peer.named_modules():
        if getattr(module, "unit_offset", False):  # the peer adds 1 to what it stores
            state[f"{name}.g"] = state[f"{name}.g"] - 1
    buffers = {name: b for name, b in peer.named_buffers() if name not in state}  # rotary inv_freq
    assert set(state) | set(buffers) == set(peer.state_dict())
    return {name: t.detach().clone() for name, t in (state | buffers).items()}


def assert_close(ours: torch.Tensor, peer: torch.Tensor, what: str) -> None:
    error = (ours - peer).abs().max().item()
    assert error <= 1e-7 * max(1.0, peer.abs().max().item()), f"{what}: max |difference| {error:.2e}"


@pytest.mark.parametrize("attention", [
    {"variant": "vanilla"}, {"variant": "gqa", "kv_heads": 2}, {"variant": "gqa", "kv_heads": 1},
    {"variant": "residual"}, {"variant": "selective"}, {"variant": "selective", "kv_heads": 2},
], ids=lambda a: "-".join(map(str, a.values())))
def test_logits_and_gradients_match_x_transformers(attention):
    ours, peer = models(attention)
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    logits, peer_logits = ours(tokens), peer(tokens)
    assert_close(logits, peer_logits, "logits")
    weights = torch.randn_like(logits)  # a loss whose gradient reaches every layer
    (logits * weights).sum().backward()
    (peer_logits * weights).sum().backward()
    assert_close(ours.token_embedding.weight.grad, peer.token_emb.emb.weight.grad, "token embedding gradient")


def test_selective_with_residual_scores_differs_only_in_what_selection_reads(monkeypatch):
    """With residual scores the two agree but for one choice: x-transformers takes the selection scores S from
    the logits after adding the carried scores, ReLU(L^s + R_{l-1}); ours from the layer's own, ReLU(L^s), as
    the paper defines S for a layer. Made to select from L^s (L^s + R_{l-1} - R_{l-1}), the peer agrees."""
    import x_transformers.attend as attend

    ours, peer = models({"variant": "selective", "residual": True})
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    logits = ours(tokens)
    assert (logits - peer(tokens)).abs().max() > 1e-3  # the peer as it is: a different model from layer 1 on

    carried: list = []
    forward, selective_attn = attend.Attend.forward, attend.selective_attn

    def remember_carried(self, *args, prev_attn=None, **kwargs):
        carried[:] = [prev_attn]
        return forward(self, *args, prev_attn=prev_attn, **kwargs)

    def select_from_own_logits(sim, sim_head_gate=None, **kwargs):
        own = sim[:, 0] if carried[0] is None else (sim - carried[0])[:, 0]  # masked: -max - (-max), ReLU'd to 0
        return selective_attn(sim, own, **kwargs)

    monkeypatch.setattr(attend.Attend, "forward", remember_carried)
    monkeypatch.setattr(attend, "selective_attn", select_from_own_logits)
    assert_close(logits, peer(tokens), "logits, the peer selecting from L^s")
