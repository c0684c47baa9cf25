"""Tokenizers in their real formats (SentencePiece Unigram as T5's, byte-level BPE as GPT-2's),
their overlap by hand, and the bad input of the two-tokenizer path."""

import json
import os

import numpy as np
import pytest

from l2s_jax.data import subword
from l2s_jax.data.jsonl import DataError
from l2s_jax.data.pipeline import build_pipeline, get_default_data_config
from l2s_jax.data.tokenize import load_tokenizer, overlap_matrix

# --- hand-made tokenizers: every segmentation below is known in advance --------------------

UNIGRAM_PIECES = ["▁Café", "▁42", "!", "▁na", "ï", "ve", ",", "▁3.5", "▁l", "'", "été"]


def _unigram_dir(path):
  """A T5Tokenizer directory whose pieces cover the three sentences in exactly one way."""
  from transformers import T5Tokenizer

  vocab = [(p, 0.0) for p in subword.T5_SPECIALS] + [(p, -1.0) for p in UNIGRAM_PIECES]
  T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path)
  return path


def _bpe_dir(path):
  """A GPT2Tokenizer directory: the 256 byte symbols, a few merges, <|endoftext|>."""
  from tokenizers import pre_tokenizers
  from transformers import GPT2Tokenizer

  merges = [
    ("C", "a"),
    ("Ã", "©"),
    ("Ġ", "4"),
    ("n", "a"),
    ("Ã", "¯"),
    ("na", "Ã¯"),
    ("v", "e"),
    ("naÃ¯", "ve"),
    ("Ġ", "3"),
  ]
  symbols = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in merges]
  vocab = {s: i for i, s in enumerate(symbols)}
  vocab[subword.GPT2_SPECIAL] = len(vocab)
  GPT2Tokenizer(vocab=vocab, merges=merges, pad_token=subword.GPT2_SPECIAL).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
  root = tmp_path_factory.mktemp("hand_made")
  return (
    load_tokenizer(_unigram_dir(str(root / "unigram"))),
    load_tokenizer(_bpe_dir(str(root / "bpe"))),
  )


def _pieces(tok, text):
  ids, spans = tok.encode(text)
  return tok.hf.convert_ids_to_tokens(ids), spans


# Each sentence: (text, the BPE's pieces, the Unigram's pieces, overlap [bpe, unigram]).
SENTENCES = [
  # accents (é is two bytes, one BPE symbol after a merge) and digits split on one side only
  (
    "Café 42!",
    ["Ca", "f", "Ã©", "Ġ4", "2", "!"],
    ["▁Café", "▁42", "!"],
    [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]],
  ),
  # a word whole for the BPE and in three pieces for the Unigram; a number the other way
  (
    "naïve, 3.5",
    ["naÃ¯ve", ",", "Ġ3", ".", "5"],
    ["▁na", "ï", "ve", ",", "▁3.5"],
    [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]],
  ),
  # punctuation inside a word, accents at both ends of a piece
  (
    "l'été",
    ["l", "'", "Ã©", "t", "Ã©"],
    ["▁l", "'", "été"],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]],
  ),
]


@pytest.mark.parametrize("text,bpe_pieces,unigram_pieces,expected", SENTENCES)
def test_overlap_of_unigram_and_byte_bpe_by_hand(
  hand_made, text, bpe_pieces, unigram_pieces, expected
):
  unigram, bpe = hand_made
  assert type(unigram.hf).__name__ == "T5Tokenizer" and type(bpe.hf).__name__ == "GPT2Tokenizer"
  b_pieces, b_spans = _pieces(bpe, text)
  u_pieces, u_spans = _pieces(unigram, text)
  assert b_pieces == bpe_pieces and u_pieces == unigram_pieces
  np.testing.assert_array_equal(overlap_matrix(text, b_spans, u_spans), np.array(expected))


def test_trained_tokenizers_are_the_real_formats_and_reproducible(tmp_path):
  texts = ["the café has 12 cups, 3.5 liters!", "naïve users' tokenizers split words"] * 40
  u = subword.train_unigram(texts, 60)
  assert u.backend_tokenizer.to_str() == subword.train_unigram(texts, 60).backend_tokenizer.to_str()
  b = subword.train_byte_bpe(texts, 300)
  for tok, name, cls in ((u, "u", "T5Tokenizer"), (b, "b", "GPT2Tokenizer")):
    subword.save(tok, str(tmp_path / name))
    config = json.load(open(tmp_path / name / "tokenizer_config.json"))
    assert config["tokenizer_class"] == cls
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / name))
    for text in texts[:2] + ["unseen wörds 7"]:
      assert again(text)["input_ids"] == tok(text)["input_ids"]
  assert u.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
  assert u("ab")["input_ids"][-1] == 1  # T5 appends </s>
  assert b.decode(b("unseen wörds ✓")["input_ids"]) == "unseen wörds ✓"  # every byte fits
  with pytest.raises(ValueError, match="at least 257 ids"):
    subword.train_byte_bpe(texts, 100)


def _cfg(**kw):
  c = get_default_data_config()
  c.synthetic.num_train, c.synthetic.num_validation, c.synthetic.num_test = 300, 8, 8
  c.tokenizer_corpus = 300
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _pipeline(cfg, workdir, kind="decoder_only"):
  return build_pipeline(cfg, model_kind=kind, hybrid=True, batch_size=2, workdir=workdir)


def test_a_trained_tokenizer_is_kept_in_the_workdir_and_reused(tmp_path):
  cfg = _cfg(tokenizer="byte_bpe:300", llm_tokenizer="unigram:120")
  first = _pipeline(cfg, str(tmp_path))
  assert first.vocab_size == 300 and not first.shared_tokenizer
  stamp = os.path.getmtime(tmp_path / "llm_tokenizer" / "tokenizer.json")
  again = _pipeline(cfg, str(tmp_path))
  assert os.path.getmtime(tmp_path / "llm_tokenizer" / "tokenizer.json") == stamp
  assert again.llm_tokenizer.identity() == first.llm_tokenizer.identity()
  # Another spec on the same workdir is refused, and the tokenizer on disk kept.
  with pytest.raises(DataError, match="trained as 'unigram:120'.*use a new workdir"):
    _pipeline(_cfg(tokenizer="byte_bpe:300", llm_tokenizer="unigram:200"), str(tmp_path))
  assert os.path.getmtime(tmp_path / "llm_tokenizer" / "tokenizer.json") == stamp
  with pytest.raises(DataError, match="vocabulary size after ':' must be an integer"):
    _pipeline(_cfg(tokenizer="byte_bpe:many"), str(tmp_path / "x"))


def test_a_tokenizer_without_offsets_is_refused_where_pooling_needs_them(tmp_path, hand_made):
  from transformers import ByT5Tokenizer

  slow = str(tmp_path / "byt5_slow")
  ByT5Tokenizer().save_pretrained(slow)  # pure Python: no offsets
  unigram_dir = hand_made[0].name
  with pytest.raises(
    DataError, match="data.llm_tokenizer .*byt5_slow.* gives no character offsets .*ByT5Tokenizer"
  ):
    _pipeline(_cfg(tokenizer=unigram_dir, llm_tokenizer=slow, source="synthetic"), None)
  # Alone (nothing to pool), the same tokenizer serves.
  alone = build_pipeline(
    _cfg(tokenizer=slow), model_kind="encoder_decoder", hybrid=False, batch_size=2
  )
  assert alone.vocab_size == len(ByT5Tokenizer())


def test_llm_side_truncation_warns_like_the_slm_side(tmp_path, caplog):
  cfg = _cfg(
    tokenizer="byte_bpe:300",
    llm_tokenizer="unigram:120",
    max_prompt_len=6,
    max_target_len=64,
    prompt_buckets=(8,),
    target_buckets=(64,),
  )
  p = _pipeline(cfg, str(tmp_path))
  caplog.set_level("WARNING")
  batch = next(iter(p.iterator("train", shuffle=False, repeat=False)))
  assert batch["llm_inputs"].shape[1] == 8 and batch["llm_inputs_mask"].sum(1).max() == 6
  assert "llm prompt of" in caplog.text and "truncated to 5" in caplog.text
  assert p.featurizer.truncations.llm_prompts >= 1
