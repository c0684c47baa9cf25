"""Text metrics the papers report: sacrebleu's BLEU and chrF, Google's rouge-score, and
FS-GEN's task accuracies (exact match, GSM8K final number, multiple-choice letter).

Both libraries are the references their communities compare against, so
we call them rather than re-implementing tokenisation or aggregation:
BLEU/chrF are corpus-level with sacrebleu's default tokeniser (the
signature is kept with the score); ROUGE is the mean over examples of the
F-measure of rouge-score's scorer (with the Porter stemmer, as is usual for
CNN/DailyMail), times 100.

The accuracies are the percentage of examples whose answer, extracted from
the output by a fixed rule (each function's docstring), equals the
reference's; an output the rule finds no answer in is wrong. Each returns
the score (0-100), `examples`, `unanswered` (outputs with no answer found)
and `correct` (one bool per example, in order).
"""

from __future__ import annotations

import decimal
import re
from typing import Callable, Sequence

from sacrebleu.metrics import BLEU, CHRF

TRANSLATION_METRICS = ("bleu", "chrf")
SUMMARIZATION_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
  if not hyps:
    raise ValueError("no examples to score")


def translation_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Corpus BLEU and chrF (0-100) with their sacrebleu signatures."""
  _check(hyps, refs)
  bleu, chrf = BLEU(), CHRF()
  b = bleu.corpus_score(list(hyps), [list(refs)])
  c = chrf.corpus_score(list(hyps), [list(refs)])
  return {
    "bleu": b.score,
    "chrf": c.score,
    "bleu_signature": str(bleu.get_signature()),
    "chrf_signature": str(chrf.get_signature()),
    "bleu_details": {
      "precisions": b.precisions,
      "bp": b.bp,
      "sys_len": b.sys_len,
      "ref_len": b.ref_len,
    },
  }


def summarization_scores(
  hyps: Sequence[str], refs: Sequence[str], *, use_stemmer: bool = True
) -> dict:
  """Mean ROUGE-1/2/L/Lsum F-measure (0-100). Lsum splits sentences on newlines."""
  from rouge_score import rouge_scorer  # noqa: PLC0415 (heavy, nltk: summarization only)

  _check(hyps, refs)
  scorer = rouge_scorer.RougeScorer(list(SUMMARIZATION_METRICS), use_stemmer=use_stemmer)
  totals = {k: 0.0 for k in SUMMARIZATION_METRICS}
  for hyp, ref in zip(hyps, refs):
    scores = scorer.score(ref, hyp)  # (target, prediction)
    for k in SUMMARIZATION_METRICS:
      totals[k] += scores[k].fmeasure
  out = {k: 100.0 * v / len(hyps) for k, v in totals.items()}
  out["rouge_settings"] = f"rouge-score, F-measure mean, use_stemmer={use_stemmer}"
  return out


def normalize_answer(text: str) -> str:
  """Outer whitespace stripped, inner runs of whitespace made one space; case is kept."""
  return " ".join(text.split())


def exact_match_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Percentage of outputs equal to their reference after `normalize_answer`.

  Case-sensitive and punctuation-sensitive, as FS-GEN's free-form BBH check and
  lm-evaluation-harness's exact_match (ignore_case=False) are: a task that wants a looser
  comparison says so in its references.
  """
  _check(hyps, refs)
  correct = [normalize_answer(h) == normalize_answer(r) for h, r in zip(hyps, refs)]
  return _accuracy(
    "exact_match",
    correct,
    unanswered=sum(not h.strip() for h in hyps),
    rule="strip, collapse whitespace, case-sensitive",
  )


# A number as written in text: thousands grouped by commas (1,000,000) or not, an optional
# decimal part, and a minus sign unless it joins two words or numbers ("3-5", "x-2").
_NUMBER = re.compile(
  r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
  r"|(?:(?<![\w.])-)?(?<!\d)\.\d+"
)


def _numbers(text: str) -> list[decimal.Decimal]:
  return [decimal.Decimal(m.group().replace(",", "")) for m in _NUMBER.finditer(text)]


def gsm8k_answer(text: str) -> decimal.Decimal | None:
  """The last number of `text` ("1,000" is 1000, "-3", "72.0" == 72; the period ending
  a sentence is not a decimal point), or None when it holds no number."""
  numbers = _numbers(text)
  return numbers[-1] if numbers else None


def gsm8k_reference(text: str) -> decimal.Decimal | None:
  """A GSM8K answer's number: the one after its last "####"; without "####", its last."""
  _, mark, tail = text.rpartition("####")
  numbers = _numbers(tail if mark else text)
  return (numbers[0] if mark else numbers[-1]) if numbers else None


def gsm8k_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Percentage of outputs whose last number equals the reference's final answer.

  Compared as numbers, not strings (FS-GEN compares the strings of its last `\\d*\\.?\\d+`
  matches, which misses "1,000" vs "1000", "72.0" vs "72" and signs).
  """
  return _extracted_accuracy(
    "accuracy",
    hyps,
    refs,
    gsm8k_answer,
    gsm8k_reference,
    "last number of the output vs the number after the reference's "
    "'####' (else its last number), compared as numbers",
  )


# An explicit answer: "answer is B", "Answer: (B)", "The answer is **B**."; the marker in any
# case, the letter a capital standing alone.
_MARKED_CHOICE = re.compile(r"\b(?i:answer(?:\s+is)?)\s*:?\s*[(\[*]*\s*([A-Z])(?![A-Za-z0-9'])")
# A letter the output begins with, set off by brackets or punctuation: "B", "(B)", "B.",
# "B) Paris", "B: Paris". A letter followed by a space and a word is not one ("A cat", "I
# think").
_LEADING_CHOICE = re.compile(r"[(\[*]*([A-Z])(?:[)\]*.:,]|\s*$)")
_BRACKETED_CHOICE = re.compile(r"\(([A-Z])\)")


def choice_letter(text: str) -> str | None:
  """The option letter an output (or a reference) gives, by the first rule that applies:

  1. the first "answer is X" / "answer: X" (X optionally in brackets or bold);
  2. a letter the text begins with, alone or followed by ")", "]", ".", ":" or ",";
  3. the first "(X)" anywhere.
  Letters are capitals A-Z (a lone lowercase "a" is too often the article); None when no
  rule applies. FS-GEN's MMLU check lowercases, tries "answer is (", "answer is ", "(" in
  turn and, finding none, predicts "C"; here an output with no letter is wrong.
  """
  for rule in (
    _MARKED_CHOICE.search(text),
    _LEADING_CHOICE.match(text.strip()),
    _BRACKETED_CHOICE.search(text),
  ):
    if rule:
      return rule.group(1)
  return None


def multiple_choice_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Percentage of outputs whose option letter (`choice_letter`) is the reference's."""
  return _extracted_accuracy(
    "accuracy",
    hyps,
    refs,
    choice_letter,
    choice_letter,
    "first of: 'answer is X' / 'answer: X', a leading letter set "
    "off by punctuation, '(X)'; capitals A-Z",
  )


def _extracted_accuracy(
  name: str,
  hyps: Sequence[str],
  refs: Sequence[str],
  answer: Callable,
  reference: Callable,
  rule: str,
) -> dict:
  _check(hyps, refs)
  golds = []
  for i, ref in enumerate(refs):
    gold = reference(ref)
    if gold is None:  # a data error, not a model's: the example cannot be scored
      raise ValueError(f"reference {i} has no answer to compare against ({rule}): {ref!r}")
    golds.append(gold)
  preds = [answer(h) for h in hyps]
  correct = [p is not None and p == g for p, g in zip(preds, golds)]
  return _accuracy(name, correct, unanswered=sum(p is None for p in preds), rule=rule)


def _accuracy(name: str, correct: list[bool], *, unanswered: int, rule: str) -> dict:
  return {
    name: 100.0 * sum(correct) / len(correct),
    "examples": len(correct),
    "unanswered": unanswered,
    "correct": correct,
    "answer_rule": rule,
  }


_TASK_SCORES = {
  "translation": translation_scores,
  "summarization": summarization_scores,
  "exact_match": exact_match_scores,
  "gsm8k": gsm8k_scores,
  "multiple_choice": multiple_choice_scores,
}
TASK_TYPES = tuple(_TASK_SCORES)  # the values of config.data.task_type
# The one number a task's outputs are ranked by (studies and sweeps report it as "quality").
PRIMARY = {
  "translation": "bleu",
  "summarization": "rougeL",
  "exact_match": "exact_match",
  "gsm8k": "accuracy",
  "multiple_choice": "accuracy",
}


def check_task_type(task_type: str, field: str = "task type") -> None:
  if task_type not in TASK_TYPES:
    raise ValueError(f"unknown {field} {task_type!r}: use one of {', '.join(TASK_TYPES)}")


def scores_for_task(task_type: str, hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """The metrics of `task_type` (one of TASK_TYPES) for outputs `hyps` against `refs`."""
  check_task_type(task_type)
  return _TASK_SCORES[task_type](hyps, refs)
