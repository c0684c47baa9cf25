"""Subword tokenizers in the formats published checkpoints ship, trained offline on a corpus.

  unigram   T5's scheme: a SentencePiece Unigram model over "▁"-marked words,
            <pad> 0, </s> 1, <unk> 2; a transformers
            `T5Tokenizer` directory.
  byte_bpe  GPT-2's scheme: byte-level BPE (every byte representable, no
            unknown token), "<|endoftext|>" as BOS/EOS/UNK and as padding; a
            transformers `GPT2Tokenizer` directory.

Both are trained with the `tokenizers` library (the engine behind
transformers' tokenizers), so no download and no `sentencepiece` are needed,
and saved with `save_pretrained`: `AutoTokenizer.from_pretrained(directory)`
reads them as it reads a hub checkpoint's. The pipeline trains one when
`data.tokenizer` (or `data.llm_tokenizer`) names a kind and keeps it in the
workdir, so evaluation and resumed runs read the very same vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

KINDS = ("unigram", "byte_bpe")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
GPT2_SPECIAL = "<|endoftext|>"


def train_unigram(texts: Iterable[str], vocab_size: int):
  """A T5-style Unigram tokenizer (transformers `T5Tokenizer`) of at most `vocab_size` ids.

  The trainer is multi-threaded: its scores vary in the last bits from run to
  run and equal scores come in any order. Scores are rounded to 6 decimals and
  pieces put in a canonical order (score, then text), so the same corpus gives
  the same ids on every run and every process. No normalizer: transformers'
  `T5Tokenizer` reads one back only as SentencePiece's precompiled map.
  """
  from transformers import T5Tokenizer  # noqa: PLC0415 (heavy: loads torch)

  backend = Tokenizer(models.Unigram())
  backend.pre_tokenizer = _metaspace()
  trainer = trainers.UnigramTrainer(
    vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), unk_token="<unk>", show_progress=False
  )
  backend.train_from_iterator(texts, trainer)
  pieces = [
    (p, round(s, 6))
    for p, s in json.loads(backend.to_str())["model"]["vocab"]
    if p not in T5_SPECIALS
  ]
  pieces.sort(key=lambda ps: (-ps[1], ps[0]))
  vocab = [(p, 0.0) for p in T5_SPECIALS] + pieces
  return T5Tokenizer(vocab=vocab, extra_ids=0)


def _metaspace():
  return pre_tokenizers.Sequence(
    [
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ]
  )


def train_byte_bpe(texts: Iterable[str], vocab_size: int):
  """A GPT-2-style byte-level BPE (transformers `GPT2Tokenizer`) of at most `vocab_size` ids
  (at least the 256 bytes and the special token)."""
  from transformers import GPT2Tokenizer  # noqa: PLC0415 (heavy: loads torch)

  if vocab_size < 257:
    raise ValueError(
      f"a byte-level BPE needs at least 257 ids (256 bytes + "
      f"{GPT2_SPECIAL}), got vocab_size {vocab_size}"
    )
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[GPT2_SPECIAL],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  backend.train_from_iterator(texts, trainer)
  model = json.loads(backend.to_str())["model"]
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return GPT2Tokenizer(vocab=model["vocab"], merges=merges, pad_token=GPT2_SPECIAL)


def train(kind: str, texts: Iterable[str], vocab_size: int):
  if kind == "unigram":
    return train_unigram(texts, vocab_size)
  if kind == "byte_bpe":
    return train_byte_bpe(texts, vocab_size)
  raise ValueError(f"tokenizer kind {kind!r}: use one of {KINDS}")


def save(tokenizer, directory: str) -> None:
  """`save_pretrained` into `directory`, each file written aside and moved into place whole
  (readers and the other processes of a job never see a half-written tokenizer)."""
  os.makedirs(directory, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=directory)
  try:
    tokenizer.save_pretrained(tmp)
    # tokenizer.json last: its presence is what marks the directory complete.
    names = sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json")
    for name in names:
      os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
