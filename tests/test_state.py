"""State channels: a layout is a tuple over a small vocabulary, refused at declaration otherwise, and every
write is checked against its channel's layout and dtype, with the writing layer's sizes, when it is made."""
from __future__ import annotations

import re

import pytest
import torch

from attention_zoo import Param, ProjectedAttention, build_model, declare_channel, register_variant
from attention_zoo.state import CHANNELS, RESIDUAL_SCORES, SELECTION_PENALTY
from attention_zoo.variant import BASE_PARAMS
from tests.cases import variant_config

PROBE = "zoo_probe"
B, N, HEADS, DIM = 2, 6, 4, 32


@pytest.fixture
def channels():
    """CHANNELS as it was before the test: what the test declares is forgotten after it."""
    before = dict(CHANNELS)
    yield CHANNELS
    CHANNELS.clear()
    CHANNELS.update(before)


def test_builtin_layouts_parse():
    assert RESIDUAL_SCORES.dims == ("B", "H", "Nq", "Nk")
    assert SELECTION_PENALTY.dims == ("B", "Nq", "Nk")


@pytest.mark.parametrize("layout,dims", [("(B, Hkv, Nk, D)", ("B", "Hkv", "Nk", "D")), ("(B,1,Nq,Nk)", ("B", 1, "Nq", "Nk")),
                                         ("(B,)", ("B",)), ("()", ())])
def test_valid_layouts(channels, layout, dims):
    assert declare_channel(PROBE, layout, None, "probe").dims == dims


@pytest.mark.parametrize("layout,why", [
    ("(B, H, N)", r"unknown dimension 'N'; did you mean 'Nq', 'Nk'\?"),  # the trial's example
    ("B H Nq Nk", "not a parenthesised, comma-separated tuple"),
    ("(B, Hk, Nq)", "unknown dimension 'Hk'; did you mean 'Hkv'"),
    ("(B, 0)", "unknown dimension '0'"),
    ("", "not a parenthesised"),
])
def test_malformed_or_unknown_layout_is_refused_at_declaration(channels, layout, why):
    with pytest.raises(ValueError, match=why) as refused:
        declare_channel(PROBE, layout, torch.float32, "probe")
    message = str(refused.value)
    assert f"'{PROBE}'" in message and repr(layout) in message and "valid: B, H, Hkv, Nq, Nk, D" in message
    assert PROBE not in CHANNELS


@pytest.fixture
def writer(channels, isolated_registry):
    """build(mode): a 2-layer model of a plug-in variant writing PROBE, declared (B, H, Nq, Nk) float32."""
    declare_channel(PROBE, "(B, H, Nq, Nk)", torch.float32, "a probe written by zoo_writes_state")

    @register_variant("zoo_writes_state")
    class Writer(ProjectedAttention):
        """Writes PROBE, declared (B, H, Nq, Nk) float32: right, or wrong in one way (`mode`)."""

        params = {**BASE_PARAMS, "mode": Param(str, "right", choices=("right", "chunk_keys", "heads_last", "half"))}

        def __init__(self, shape, *, mode: str = "right", **base):
            super().__init__(shape, **base)
            self.mode = mode
            self.writes = (PROBE,)

        def attention_bias(self, q, k, state, cache):
            b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            value = {
                "right": lambda: q.new_zeros(b, h, nq, nk),
                "chunk_keys": lambda: q.new_zeros(b, h, nq, nq),  # the new keys only: right until a cache holds keys
                "heads_last": lambda: q.new_zeros(b, nq, nk, h),
                "half": lambda: q.new_zeros(b, h, nq, nk, dtype=torch.float16),
            }[self.mode]()
            return None, {PROBE: value}

    def build(mode: str):
        sizes = {"vocab_size": 32, "dim": DIM, "depth": 2, "heads": HEADS, "max_seq_len": 16}
        return build_model(variant_config("zoo_writes_state", {"mode": mode}, **sizes))

    return build


def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (B, N), generator=torch.Generator().manual_seed(0))


def test_a_right_write_passes(writer):
    _, per_layer = writer("right")(tokens(), return_state=True)
    assert per_layer[1][PROBE].shape == (B, HEADS, N, N)


def test_a_wrongly_shaped_write_fails_at_forward_naming_layer_channel_layout_and_value(writer):
    expected = (f"layer 0 (Writer) wrote state '{PROBE}' as Tensor of shape ({B}, {N}, {N}, {HEADS}), float32; "
                f"the channel is (B, H, Nq, Nk) = ({B}, {HEADS}, {N}, {N}), float32 or wider")
    with pytest.raises(ValueError, match=re.escape(expected)):
        writer("heads_last")(tokens())


def test_a_write_of_the_wrong_dtype_fails_at_forward(writer):
    with pytest.raises(ValueError, match=re.escape(f"wrote state '{PROBE}' as Tensor of shape ({B}, {HEADS}, {N}, {N}), "
                                                   "float16; the channel is (B, H, Nq, Nk)")):
        writer("half")(tokens())


def test_cached_decoding_checks_new_rows_against_every_visible_key(writer):
    """Nq is the new rows and Nk the cached and new keys: a value over the chunk's own keys passes a full forward
    and the first chunk (Nq = Nk there), and fails on the next chunk, when the cache holds keys."""
    x = tokens()
    for mode in ("right", "chunk_keys"):
        model = writer(mode).eval()
        with torch.no_grad():
            model(x)
            cache = model.new_cache()
            model(x[:, :4], cache)
            if mode == "right":
                _, per_layer = model(x[:, 4:5], cache, return_state=True)
                assert per_layer[0][PROBE].shape == (B, HEADS, 1, 5)
            else:
                with pytest.raises(ValueError, match=re.escape(f"(B, H, Nq, Nk) = ({B}, {HEADS}, 1, 5)")):
                    model(x[:, 4:5], cache)


def test_builtin_structured_writes_are_checked_too(monkeypatch):
    """A Selection is checked by its .shape and .dtype: a channel declared over other sizes refuses it."""
    monkeypatch.setitem(CHANNELS, SELECTION_PENALTY.name, type(SELECTION_PENALTY)(
        SELECTION_PENALTY.name, "(B, H, Nq, Nk)", torch.float32, "as if declared per head"))
    model = build_model(variant_config("selective", {}, vocab_size=32, dim=DIM, depth=1, heads=HEADS, max_seq_len=16))
    with pytest.raises(ValueError, match=r"layer 0 \(Selective\) wrote state 'selection_penalty' as Selection of shape"):
        model(tokens())


def test_a_variant_that_replaces_forward_is_checked_too(channels, isolated_registry):
    """The check sits in the stack: a variant whose own forward writes state (skipping ProjectedAttention's)
    handed a (3, 3) int8 value to a later layer declared (B, H, Nq) float32. A non-tensor write and a dtype that
    is not a torch.dtype are ValueErrors (they were AttributeErrors at the first write)."""
    declare_channel("zoo_gate", "(B, H, Nq)", torch.float32, "a test channel")

    @register_variant("zoo_own_forward")
    class OwnForward(ProjectedAttention):
        params = {**ProjectedAttention.params, "value": Param(str, "int8", "what to write")}

        def __init__(self, shape, *, value="int8", **base):
            super().__init__(shape, **base)
            self.writes, self.value = ("zoo_gate",), value

        def forward(self, x, state, cache=None, positions=None):
            out, _ = super().forward(x, state, cache, positions)
            wrong = {"int8": torch.zeros(3, 3, dtype=torch.int8), "list": [1.0, 2.0]}[self.value]
            return out, {"zoo_gate": wrong}

    for value, message in (("int8", r"layer 0 \(OwnForward\) wrote state 'zoo_gate' as Tensor of shape \(3, 3\), int8; "
                                    r"the channel is \(B, H, Nq\) = \(2, 4, 6\), float32"),
                           ("list", r"layer 0 \(OwnForward\) wrote state 'zoo_gate' as list; expected a tensor")):
        model = build_model(variant_config("zoo_own_forward", {"value": value}, vocab_size=32, dim=DIM, depth=1,
                                           heads=HEADS, max_seq_len=16))
        with pytest.raises(ValueError, match=message):
            model(tokens())
    with pytest.raises(ValueError, match=r"state channel 'zoo_bad_dtype': dtype 'float32' is not a torch.dtype"):
        declare_channel("zoo_bad_dtype", "(B, H)", "float32", "a dtype given as a string")


def test_a_plain_module_variant_with_kv_heads_none_writes_an_hkv_channel(channels, isolated_registry, tmp_path):
    """A variant that is a plain nn.Module (the AttentionVariant protocol, no ProjectedAttention) keeping its
    kv_heads Param as given (None: one kv head per query head) had every write to an Hkv channel refused
    (Hkv = None). And a broken write is found before the run folder is written (it was found after, which left
    a folder that a rerun took for a run)."""
    from torch import nn

    from attention_zoo.config import load_config
    from attention_zoo.train import train
    from attention_zoo.variant import KV_HEADS

    declare_channel("zoo_kv_stat", "(B, Hkv, Nq)", torch.float32, "a per-kv-head statistic")

    @register_variant("zoo_plain_module")
    class Plain(nn.Module):
        params = {"kv_heads": KV_HEADS, "wrong": Param(bool, False, "write the wrong shape")}

        def __init__(self, shape, *, kv_heads=None, wrong=False, backend="auto"):
            super().__init__()
            self.shape, self.kv_heads, self.wrong = shape, kv_heads, wrong
            self.reads, self.optional_reads, self.writes = (), (), ("zoo_kv_stat",)
            self.proj = nn.Linear(shape.dim, shape.dim)

        def forward(self, x, state, cache=None, positions=None):
            groups = (self.kv_heads or self.shape.heads) + (1 if self.wrong else 0)
            return self.proj(x), {"zoo_kv_stat": x.new_zeros(x.shape[0], groups, x.shape[1])}

    config = {"vocab_size": 32, "dim": DIM, "depth": 2, "heads": HEADS, "max_seq_len": 16}
    for kv_heads in (None, 2):
        build_model(variant_config("zoo_plain_module", {"kv_heads": kv_heads}, **config))(tokens())
    run = {**variant_config("zoo_plain_module", {"wrong": True}, **{**config, "vocab_size": 256}),
           "train": {"steps": 1, "batch_size": 2, "seq_len": 8, "eval_every": 0, "eval_batches": 1, "device": "cpu"}}
    with pytest.raises(ValueError, match=r"wrote state 'zoo_kv_stat' as Tensor of shape \(1, 5, 2\)"):
        train(load_config(run), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
