"""Sizes far beyond any real model are typos: refused in validation (they exhausted memory or overflowed inside
torch), and a model that validates but cannot be allocated is one message with its size, not a traceback."""
from __future__ import annotations

import pytest

from attention_zoo import ConfigError, build_model, load_config
from attention_zoo.errors import UserError


@pytest.mark.parametrize("key, value, limit", [("depth", 10**20, "10,000"), ("vocab_size", 10**20, "2,147,483,647"),
                                               ("dim", 2**21, "1,048,576"), ("heads", 2**17, "65,536"),
                                               ("head_dim", 2**17, "65,536"), ("max_seq_len", 2**40, "2,147,483,647")])
def test_an_absurd_size_is_refused_in_validation(key, value, limit):
    with pytest.raises(ConfigError, match=rf"model.{key} = {value}: must be <= {limit} \(a typo\?\)"):
        load_config({"model": {key: value}})


def test_sizes_at_the_limit_validate():
    """(depth at its limit too, but 10,000 layers take seconds to check on the meta device.)"""
    config = load_config({"model": {"vocab_size": 2**31 - 1, "head_dim": 2**16, "max_seq_len": 2**31 - 1}})
    assert config["model"]["vocab_size"] == 2**31 - 1


def test_a_model_too_large_to_allocate_is_one_message_with_its_size():
    """8 TiB of weights (2e9 tokens x 1024 wide): no machine allocates it; the error counts its parameters."""
    with pytest.raises(UserError, match=r"the model does not fit in memory: 4,\d{3},\d{3},\d{3},\d{3} parameters "
                                        r"\(15,\d{3}\.\d GiB in float32\)"):
        build_model({"model": {"vocab_size": 2_000_000_000, "dim": 1024, "depth": 1, "heads": 8,
                               "tie_embeddings": False}})
