"""The tiny model's tokenizer: byte-level BPE trained with the `tokenizers` library on the task
corpus, with every digit its own token (numbers are then spelled digit by digit, which small models
learn arithmetic from far more easily) and the Nemotron 3 special tokens."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nemotron.io.tokenizer import NEMOTRON3_SPECIAL_TOKENS, write_tokenizer_files


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train on `texts` and write tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(NEMOTRON3_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    write_tokenizer_files(tok, out_dir)
    return Path(out_dir)
