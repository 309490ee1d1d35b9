"""The dry run's backward (dry_run.py, autograd_owners.py): a plug-in whose forward works and whose backward raises
is a config problem at the key that chose it, found by validate, describe --train, ablate and train before anything
trains; what only the meta device causes is no problem."""
from __future__ import annotations

import pytest
import torch
import yaml

from attention_zoo import ProjectedAttention, register_variant
from attention_zoo.cli import main

TRAIN = {"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 0, "device": "cpu"}
BACKWARD = "the backward of the model's forward on the meta device (1 x 16 tokens) raised"


def config_file(tmp_path, attention: dict, *, layer_1_only: bool = True, **model) -> str:
    """A training config of two layers: vanilla, and `attention` on layer 1 (or on both)."""
    m = {"vocab_size": 256, "dim": 32, "depth": 2, "heads": 4, "max_seq_len": 16, **model}
    if layer_1_only:
        m.update(attention={"variant": "vanilla"}, layers=[{"at": 1, "attention": attention}])
    else:
        m["attention"] = attention
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": m, "train": TRAIN}))
    return str(path)


class Refuses(torch.autograd.Function):
    """The identity forward; a backward that raises, as a custom kernel's unfinished backward does."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the backward kernel is not written yet")


class ReadsValues(torch.autograd.Function):
    """A backward that reads a value (a scale from the gradient's maximum): fine on any real device."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / max(float(grad.abs().max().item()), 1.0)


class MadeOnCPU(torch.autograd.Function):
    """A backward that adds a tensor made on the CPU: fine on a CPU, an error on a GPU."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad + torch.zeros(grad.shape[-1])


def variant_through(name: str, function) -> type:
    """Register a variant `name` whose attend() passes q through `function` (a callable on a tensor)."""

    @register_variant(name)
    class Through(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attend(self, q, k, v, bias):
            return super().attend(function(q), k, v, bias)

    return Through


@pytest.mark.parametrize("function,raised", [
    (Refuses.apply, "RuntimeError: the backward kernel is not written yet (at " + __file__),
    (lambda q: torch.igamma(q.abs() + 1, torch.ones_like(q)),  # an op whose derivative torch does not implement
     "NotImplementedError: the derivative for 'igamma: input' is not implemented"),
])
def test_a_variant_whose_backward_raises_is_a_problem_before_anything_trains(function, raised, isolated_registry,
                                                                            tmp_path, capsys):
    """Its forward works, so validate said ok and train wrote its run folder and died at step 1 with a traceback.
    validate, describe --train and train run the backward on the meta device: one problem at the key that chose the
    variant, naming the layer and that its backward failed; exit 2, no run folder."""
    cls = variant_through("zoo_bad_backward", function)
    cfg = config_file(tmp_path, {"variant": "zoo_bad_backward"})
    problem = (f"c.yaml: model.layers[0].attention.variant = 'zoo_bad_backward': layer 1 "
               f"({cls.__module__}.{cls.__qualname__}): {BACKWARD} {raised}")
    for argv in (["validate", cfg], ["describe", cfg, "--train"],
                 ["train", cfg, "--out", str(tmp_path / "run"), "--no-progress"]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert problem in text and "Traceback" not in text, text
    assert not (tmp_path / "run").exists()
    assert main(["describe", cfg]) == 0  # no gradients, no backward: what it plans is the forward's
    capsys.readouterr()


def test_each_layer_and_component_is_named_for_its_own_backward(isolated_registry, tmp_path, capsys):
    """No module hook runs in a backward: the autograd nodes are tagged with the module that made them. A variant on
    layer 0 only is named as layer 0 (not the last layer that ran forward), an MLP plug-in whose backward raises at
    model.mlp (not at the attention whose output it reads), and a positional scheme whose rotate (a method each
    attention layer calls, not a module's forward) makes a node whose backward raises at model.position."""
    from attention_zoo.components import MLPS, POSITIONS
    from attention_zoo.components.mlps import GELU
    from attention_zoo.components.positions import RotaryPositions

    variant_through("zoo_bad_backward", Refuses.apply)

    @MLPS.register("zoo_bad_backward_mlp")
    class BadBackwardMLP(GELU):
        def forward(self, x):
            return super().forward(Refuses.apply(x))

    @POSITIONS.register("zoo_bad_backward_rope")
    class BadBackwardRope(RotaryPositions):
        def rotate(self, q, k, positions):
            q, k = super().rotate(q, k, positions)
            return Refuses.apply(q), k

    try:
        cfg = config_file(tmp_path, {"variant": "vanilla"})
        data = yaml.safe_load(open(cfg))
        data["model"]["layers"] = [{"at": 0, "attention": {"variant": "zoo_bad_backward"}}]
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
        assert main(["validate", cfg]) == 2
        assert "model.layers[0].attention.variant = 'zoo_bad_backward': layer 0 (" in capsys.readouterr().out
        data["model"].update(layers=[], mlp="zoo_bad_backward_mlp")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
        assert main(["validate", cfg]) == 2
        out = capsys.readouterr().out
        assert "c.yaml: model.mlp = 'zoo_bad_backward_mlp': module blocks.1.mlp (" in out and BACKWARD in out, out
        data["model"].update(mlp="swiglu", position="zoo_bad_backward_rope")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
        assert main(["validate", cfg]) == 2
        out = capsys.readouterr().out
        assert "c.yaml: model.position = 'zoo_bad_backward_rope': module position_embedding (" in out, out
        assert BACKWARD in out, out
    finally:
        del MLPS.registry._entries["zoo_bad_backward_mlp"]
        del POSITIONS.registry._entries["zoo_bad_backward_rope"]


def test_what_only_the_meta_device_causes_is_no_problem_for_train(isolated_registry, tmp_path, capsys):
    """A backward that reads a value cannot run on the meta device and trains anywhere: passed over. One that makes
    a tensor on the CPU fails on any GPU: validate reports it, as it reports such a forward; train on a CPU, which
    accepts it, trains (its warm-up on the real device is what decides the forward's and the device's questions)."""
    variant_through("zoo_reads_values_backward", ReadsValues.apply)
    cfg = config_file(tmp_path, {"variant": "zoo_reads_values_backward"}, layer_1_only=False)
    assert main(["validate", cfg]) == 0
    assert "ok" in capsys.readouterr().out

    variant_through("zoo_cpu_backward", MadeOnCPU.apply)
    cfg = config_file(tmp_path, {"variant": "zoo_cpu_backward"}, layer_1_only=False)
    assert main(["validate", cfg]) == 2
    out = capsys.readouterr().out
    # the backward runs from the top: the last layer's failure is the one met first
    assert "model.attention.variant = 'zoo_cpu_backward': layer 1 (" in out and BACKWARD in out, out
    assert "a tensor the plug-in makes must be on its inputs' device" in out, out
    assert main(["train", cfg, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "final.json").exists()


def test_train_still_trains_a_variant_whose_forward_cannot_run_on_meta(isolated_registry, tmp_path, capsys):
    """train's dry run is only for the backward: a forward that reads values (no meta path, which validate asks
    for) trained before it and still does; the warm-up on the real device checks the forward."""

    @register_variant("zoo_reads_values_forward")
    class ReadsValuesForward(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attend(self, q, k, v, bias):
            return super().attend(q, k, v, bias) / max(float(q.abs().max().item()), 1.0)

    cfg = config_file(tmp_path, {"variant": "zoo_reads_values_forward"})
    assert main(["train", cfg, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "final.json").exists()


def test_an_in_place_op_in_a_plugin_raises_no_false_alarm(isolated_registry, tmp_path, capsys):
    """A module's full backward hooks would have blamed its `nn.ReLU(inplace=True)` (an in-place change of a hooked
    output, which training allows); the nodes are tagged instead, and the hooks and tags leave the model as it was."""
    from attention_zoo.components import MLPS
    from attention_zoo.components.mlps import GELU

    @MLPS.register("zoo_inplace_relu_mlp")
    class InPlaceReLU(GELU):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.act = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    try:
        cfg = config_file(tmp_path, {"variant": "selective"}, layer_1_only=False, mlp="zoo_inplace_relu_mlp")
        assert main(["validate", cfg]) == 0
        from attention_zoo.config import load_config
        from attention_zoo.dry_run import dry_run

        model, _, _ = dry_run(load_config(cfg), train=True)
        assert all(p.grad is None for p in model.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    finally:
        del MLPS.registry._entries["zoo_inplace_relu_mlp"]


def test_a_failure_in_the_zoos_own_backward_keeps_its_traceback(monkeypatch, tmp_path):
    """Only a plug-in's backward failure becomes a config problem; one in a built-in variant is the zoo's bug."""
    from attention_zoo.variant_registry import get_variant

    vanilla = get_variant("vanilla")
    attend = vanilla.attend
    monkeypatch.setattr(vanilla, "attend", lambda self, q, k, v, bias: attend(self, Refuses.apply(q), k, v, bias))
    with pytest.raises(RuntimeError, match="the backward kernel is not written yet"):
        main(["validate", config_file(tmp_path, {"variant": "vanilla"}, layer_1_only=False)])


def test_a_model_that_needs_no_gradient_has_no_backward_to_check():
    """Every parameter frozen: the logits need no gradient, and loss.backward() would raise ("does not require
    grad") inside the zoo's own code, a traceback for a model that has nothing to differentiate."""
    from attention_zoo.config import build_model, load_config
    from attention_zoo.dry_run import plugin_failures_reported

    config = load_config({"model": {"vocab_size": 32, "dim": 16, "depth": 1, "heads": 2, "max_seq_len": 8}})
    model = build_model(config).requires_grad_(False)
    with plugin_failures_reported(config, model, "a test forward") as backward:
        backward(model(torch.zeros(1, 4, dtype=torch.long)))
    assert all(p.grad is None for p in model.parameters())
