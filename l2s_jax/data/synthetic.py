"""A synthetic translation task that needs no download, deterministic by seed.

The source language is SVO English-like; the target language is verb-final
with gender and number agreement, so translating a sentence means
*understanding* the source, not copying it word by word:

  * reordering: the main verb moves to the end of the sentence (past the
    object and any prepositional phrase); adjectives follow their noun;
  * agreement: determiners and adjectives agree with their noun's gender
    (a lexical property of the target noun, to be memorised) and number;
  * long-range dependencies: the sentence-final verb agrees with the
    subject's number (the subject may be far away, behind a relative
    clause) and carries the tense set by a time adverb at the start;
    negation anywhere before the verb becomes a final particle.

Inflections are separate tokens ("krafro -en", "tsuschi -n -te"), so the
vocabulary stays small (stems + a few affixes) and a model's effort goes
into the grammar rather than into memorising inflected forms.

The lexicon (pseudo-words from syllables) and every example are functions
of (seed, split, index) only, so all processes and runs see the same data.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPLITS = {"train": 0, "validation": 1, "test": 2}
GENDERS = 3


@dataclasses.dataclass(frozen=True)
class SyntheticTaskConfig:
  seed: int = 0
  num_train: int = 20000
  num_validation: int = 500
  num_test: int = 500
  nouns: int = 60
  adjectives: int = 20
  verbs: int = 30
  prepositions: int = 6
  max_adjectives: int = 2  # per noun phrase
  p_relative: float = 0.35  # relative clause on the subject
  p_prepositional: float = 0.4
  p_negation: float = 0.3
  p_time_adverb: float = 0.5
  p_plural: float = 0.4

  def size(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[
      split
    ]


_SRC_SYLLABLES = (
  "ba be bi bo da de di do ka ke ki ko la le li lo ma me mi mo na ne ni no "
  "pa pe pi po ra re ri ro sa se si so ta te ti to va ve vi vo"
).split()
_TGT_SYLLABLES = (
  "gru gra gro schu scha schi zu za zo kru kra kro blu bla blo fru fra fro "
  "wu wa wo hu ha ho tsu tsa tso pfu pfa pfo glu gla glo dru dra dro"
).split()


def _words(rng: np.random.Generator, n: int, syllables, taken: set, min_syl=2, max_syl=3):
  out = []
  while len(out) < n:
    w = "".join(rng.choice(syllables, size=rng.integers(min_syl, max_syl + 1)))
    if w not in taken:
      taken.add(w)
      out.append(w)
  return out


class Lexicon:
  """Source and target word forms, all derived from the seed."""

  def __init__(self, cfg: SyntheticTaskConfig):
    rng = np.random.default_rng([cfg.seed, 7919])
    taken: set = set()
    self.src_nouns = _words(rng, cfg.nouns, _SRC_SYLLABLES, taken)
    self.src_adjs = _words(rng, cfg.adjectives, _SRC_SYLLABLES, taken)
    self.src_verbs = _words(rng, cfg.verbs, _SRC_SYLLABLES, taken)
    self.src_preps = _words(rng, cfg.prepositions, _SRC_SYLLABLES, taken, 1, 1)
    self.tgt_nouns = _words(rng, cfg.nouns, _TGT_SYLLABLES, taken)
    self.tgt_adjs = _words(rng, cfg.adjectives, _TGT_SYLLABLES, taken)
    self.tgt_verbs = _words(rng, cfg.verbs, _TGT_SYLLABLES, taken)
    self.tgt_preps = _words(rng, cfg.prepositions, _TGT_SYLLABLES, taken, 1, 2)
    self.gender = rng.integers(0, GENDERS, size=cfg.nouns)
    # Function words. Source: articles, relative pronoun, negation, time adverbs.
    self.src_det = {"def": "the", "indef": "a"}
    self.src_rel, self.src_neg = "that", "not"
    self.src_time = {"past": "yesterday", "future": "tomorrow"}
    # Target determiners by (definite, gender, plural); relative pronoun by gender.
    self.tgt_det = {
      (d, g, p): f"{'de' if d else 'ei'}{'rsn'[g]}{'a' if p else ''}"
      for d in (0, 1)
      for g in range(GENDERS)
      for p in (0, 1)
    }
    self.tgt_rel = {g: f"wel{'rsn'[g]}" for g in range(GENDERS)}
    self.tgt_neg, self.tgt_time = "nich", {"past": "gestern", "future": "morgen"}

  # Word forms: a stem, then inflection tokens.
  def src_noun(self, i, plural):
    return [self.src_nouns[i]] + (["-s"] if plural else [])

  def src_verb(self, i, tense):
    return [self.src_verbs[i]] + {"present": [], "past": ["-ed"], "future": ["-ll"]}[tense]

  def tgt_noun(self, i, plural):
    return [self.tgt_nouns[i]] + ([("-en", "-e", "-er")[self.gender[i]]] if plural else [])

  def tgt_adj(self, a, noun, plural):
    return [self.tgt_adjs[a], ("-em", "-es", "-en")[self.gender[noun]] + ("i" if plural else "")]

  def tgt_verb(self, i, plural, tense):
    return [self.tgt_verbs[i], ("-t", "-n")[plural]] + {
      "present": [],
      "past": ["-te"],
      "future": ["-wa"],
    }[tense]

  def vocabulary(self) -> list[str]:
    """Every token either language can produce, in a fixed order."""
    words = list(self.src_det.values()) + [self.src_rel, self.src_neg]
    words += list(self.src_time.values()) + list(self.tgt_time.values())
    words += [self.tgt_neg] + list(self.tgt_det.values()) + list(self.tgt_rel.values())
    words += ["-s", "-ed", "-ll", "-en", "-e", "-er", "-t", "-n", "-te", "-wa"]
    words += [g + p for g in ("-em", "-es", "-en") for p in ("", "i")]
    words += self.src_preps + self.tgt_preps + self.src_nouns + self.tgt_nouns
    words += self.src_adjs + self.tgt_adjs + self.src_verbs + self.tgt_verbs
    seen, out = set(), []
    for w in words:
      if w not in seen:
        seen.add(w)
        out.append(w)
    return out


class SyntheticTask:
  """Random access to (prompt, target) pairs of each split."""

  def __init__(self, cfg: SyntheticTaskConfig):
    self.cfg = cfg
    self.lex = Lexicon(cfg)

  def size(self, split: str) -> int:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; synthetic splits: {sorted(SPLITS)}")
    return self.cfg.size(split)

  def _noun_phrase(self, rng, definite=None):
    c, lex = self.cfg, self.lex
    noun = int(rng.integers(len(lex.src_nouns)))
    plural = bool(rng.random() < c.p_plural)
    definite = bool(rng.random() < 0.5) if definite is None else definite
    adjs = [
      int(a) for a in rng.integers(len(lex.src_adjs), size=rng.integers(0, c.max_adjectives + 1))
    ]
    src = [lex.src_det["def" if definite else "indef"]] + [lex.src_adjs[a] for a in adjs]
    src += lex.src_noun(noun, plural)
    tgt = [lex.tgt_det[(int(definite), int(lex.gender[noun]), int(plural))]]
    tgt += lex.tgt_noun(noun, plural)
    for a in adjs:
      tgt += lex.tgt_adj(a, noun, plural)
    return src, tgt, noun, plural

  def example(self, split: str, index: int) -> dict:
    n = self.size(split)
    if not 0 <= index < n:
      raise IndexError(f"index {index} outside the {split} split of {n} examples")
    c, lex = self.cfg, self.lex
    rng = np.random.default_rng([c.seed, SPLITS[split], index])
    tense = "present"
    src, tgt = [], []
    if rng.random() < c.p_time_adverb:
      tense = ("past", "future")[int(rng.integers(2))]
      src.append(lex.src_time[tense])
      tgt.append(lex.tgt_time[tense])
    s_src, s_tgt, s_noun, s_plural = self._noun_phrase(rng)
    src += s_src
    tgt += s_tgt
    if rng.random() < c.p_relative:
      # "that VERB NP" -> "REL NP VERB": the clause is verb-final too, its verb
      # agrees with the head noun.
      r_verb = int(rng.integers(len(lex.src_verbs)))
      o_src, o_tgt, _, _ = self._noun_phrase(rng)
      src += [lex.src_rel] + lex.src_verb(r_verb, tense) + o_src
      tgt += [lex.tgt_rel[int(lex.gender[s_noun])]] + o_tgt + lex.tgt_verb(r_verb, s_plural, tense)
    negated = bool(rng.random() < c.p_negation)
    verb = int(rng.integers(len(lex.src_verbs)))
    if negated:
      src.append(lex.src_neg)
    src += lex.src_verb(verb, tense)
    o_src, o_tgt, _, _ = self._noun_phrase(rng)
    src += o_src
    tgt += o_tgt
    if rng.random() < c.p_prepositional:
      prep = int(rng.integers(len(lex.src_preps)))
      p_src, p_tgt, _, _ = self._noun_phrase(rng)
      src += [lex.src_preps[prep]] + p_src
      tgt += [lex.tgt_preps[prep]] + p_tgt
    tgt += lex.tgt_verb(verb, s_plural, tense)
    if negated:
      tgt.append(lex.tgt_neg)
    return {"prompt": " ".join(src), "target": " ".join(tgt)}


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def build_tokenizer(task: SyntheticTask, directory: str):
  """A word-level fast tokenizer over the task's vocabulary, saved to `directory`.

  Loadable with transformers' AutoTokenizer; EOS is appended to every
  encoded text, as T5's tokenizer does. Returns the tokenizer.
  """
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (heavy: loads torch)

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for w in task.lex.vocabulary():
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
  )
  # Every file is written aside and moved into place whole: the processes of a
  # multi-host job (or a reader) never see a half-written tokenizer.
  os.makedirs(directory, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=directory)
  try:
    fast.save_pretrained(tmp)
    for name in os.listdir(tmp):
      os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return fast
