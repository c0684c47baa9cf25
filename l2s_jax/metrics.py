"""Text metrics the papers report: sacrebleu's BLEU and chrF, Google's rouge-score.

Both libraries are the references their communities compare against, so
we call them rather than re-implementing tokenisation or aggregation:
BLEU/chrF are corpus-level with sacrebleu's default tokeniser (the
signature is kept with the score); ROUGE is the mean over examples of the
F-measure of rouge-score's scorer (with the Porter stemmer, as is usual for
CNN/DailyMail), times 100.
"""

from __future__ import annotations

from typing import Sequence

TRANSLATION_METRICS = ("bleu", "chrf")
SUMMARIZATION_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
  if not hyps:
    raise ValueError("no examples to score")


def translation_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
  """Corpus BLEU and chrF (0-100) with their sacrebleu signatures."""
  from sacrebleu.metrics import BLEU, CHRF
  _check(hyps, refs)
  bleu, chrf = BLEU(), CHRF()
  b = bleu.corpus_score(list(hyps), [list(refs)])
  c = chrf.corpus_score(list(hyps), [list(refs)])
  return {"bleu": b.score, "chrf": c.score,
          "bleu_signature": str(bleu.get_signature()),
          "chrf_signature": str(chrf.get_signature()),
          "bleu_details": {"precisions": b.precisions, "bp": b.bp, "sys_len": b.sys_len,
                           "ref_len": b.ref_len}}


def summarization_scores(hyps: Sequence[str], refs: Sequence[str], *,
                         use_stemmer: bool = True) -> dict:
  """Mean ROUGE-1/2/L/Lsum F-measure (0-100). Lsum splits sentences on newlines."""
  from rouge_score import rouge_scorer
  _check(hyps, refs)
  scorer = rouge_scorer.RougeScorer(list(SUMMARIZATION_METRICS), use_stemmer=use_stemmer)
  totals = {k: 0.0 for k in SUMMARIZATION_METRICS}
  for hyp, ref in zip(hyps, refs):
    scores = scorer.score(ref, hyp)     # (target, prediction)
    for k in SUMMARIZATION_METRICS:
      totals[k] += scores[k].fmeasure
  out = {k: 100.0 * v / len(hyps) for k, v in totals.items()}
  out["rouge_settings"] = f"rouge-score, F-measure mean, use_stemmer={use_stemmer}"
  return out


def scores_for_task(task_type: str, hyps: Sequence[str], refs: Sequence[str]) -> dict:
  if task_type == "translation":
    return translation_scores(hyps, refs)
  if task_type == "summarization":
    return summarization_scores(hyps, refs)
  raise ValueError(f"unknown task type {task_type!r}: 'translation' or 'summarization'")
