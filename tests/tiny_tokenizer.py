"""A byte-level BPE tokenizer of 300 tokens trained in a moment on the text it is given, for the tests that need
a real transformers tokenizer without downloading one."""
from __future__ import annotations


def train_bpe(text: str, bos_token: str | None = None):
    """A transformers PreTrainedTokenizerFast: byte-level BPE (GPT-2's pre-tokenizer and decoder) with 300 tokens,
    trained on `text`; `bos_token` (if given) is a special token the tokenizer adds in front of each text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = [bos_token] if bos_token else []
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos_token)
