"""FS-GEN's task metrics (exact match, GSM8K final number, multiple-choice letter) against
hand-counted answers, and data.task_type from config to the scores eval reports."""

import decimal
import json

import pytest

from l2s_jax import config_schema, metrics
from l2s_jax.data import ENCODER_DECODER, build_pipeline

D = decimal.Decimal

# (output, reference, correct?) -- the verdicts are counted by hand.
GSM8K = [
  (
    "She sold 48 + 24 = 72 clips in total. The answer is 72.",  # trailing period
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72",
    True,
  ),
  ("So he pays $1,000.", "10 * 100 = <<10*100=1000>>1000\n#### 1000", True),  # comma
  ("It ends at -5 degrees", "3 - 8 = <<3-8=-5>>-5\n#### -5", True),  # negative
  ("72.0", "#### 72", True),  # decimal
  ("I cannot tell.", "6 * 3 = 18\n#### 18", False),  # no number
  ("First 10 + 10 = 20, then 20 + 5 = 25", "#### 30", False),
  ("The answer is 5 apples, not 3.", "#### 5", False),  # the last number is the answer
  ("12.50", "Half of 25 is 12.5", True),  # no ####: the reference's last
]

# (output, reference, correct?)
CHOICES = [
  ("B", "B", True),
  ("(B)", "B", True),
  ("C.", "C. Paris", True),
  ("The answer is A", "A", True),
  ("Answer: B) 17", "D) 42", False),
  ("A cat sat on the mat.", "A", False),  # the article, not an option: no letter
  ("Option (A) fails, so the answer is (E).", "(E)", True),  # "answer is" before "(X)"
  ("I don't know", "C", False),  # no letter
  ("the answer is: F.", "F", True),  # more than four options
]

EXACT = [
  ("  Paris \n", "Paris", True),
  ("New   York", "New York", True),
  ("paris", "Paris", False),  # case-sensitive
  ("42.", "42", False),  # punctuation counts
  ("the  cat\t", "the cat", True),
  ("", "yes", False),
]


def _split(rows):
  return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


@pytest.mark.parametrize(
  "text, number",
  [
    ("The answer is 72.", D(72)),
    ("costs $1,234.50.", D("1234.5")),
    ("1,000,000 grains", D(1000000)),
    ("x = -5", D(-5)),
    ("from 3-5 days", D(5)),  # a hyphen between numbers is no minus sign
    ("it is 72.0", D(72)),
    ("$.50 each", D("0.5")),
    ("1, 2, 3", D(3)),  # a list, not 1,2,3 grouped
    ("no digits here", None),
  ],
)
def test_gsm8k_answer_is_the_last_number(text, number):
  assert metrics.gsm8k_answer(text) == number


def test_gsm8k_reference_takes_the_number_after_hashes():
  assert metrics.gsm8k_reference("3 bags of 4 = 12 apples\n#### 12") == 12
  assert metrics.gsm8k_reference("He had 3 bags.\n#### 1,200 apples") == 1200
  assert metrics.gsm8k_reference("3 bags, so 12 in all") == 12  # no ####: the last
  with pytest.raises(ValueError, match="reference 1 has no answer"):
    metrics.gsm8k_scores(["1", "2"], ["#### 1", "#### none"])


def test_gsm8k_scores_hand_counted():
  hyps, refs, correct = _split(GSM8K)
  out = metrics.gsm8k_scores(hyps, refs)
  assert out["correct"] == correct == [True, True, True, True, False, False, False, True]
  assert out["accuracy"] == pytest.approx(100 * 5 / 8)
  assert out["examples"] == 8
  assert out["unanswered"] == 1


@pytest.mark.parametrize(
  "text, letter",
  [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B) Paris", "B"),
    ("C: 42", "C"),
    ("[D]", "D"),
    ("**D**", "D"),
    ("The answer is B", "B"),
    ("The correct answer is (C).", "C"),
    ("Answer: B) 12 apples", "B"),
    ("answer:\nA", "A"),
    ("So the answer is **E**", "E"),
    ("It must be (C) since ...", "C"),
    ("Option (A) is wrong; the answer is (D)", "D"),
    ("A cat", None),
    ("I think so", None),
    ("B is right", None),
    ("The answer is a prime number", None),
    ("b", None),
    ("", None),
  ],
)
def test_choice_letter_extraction(text, letter):
  assert metrics.choice_letter(text) == letter


def test_multiple_choice_scores_hand_counted():
  hyps, refs, correct = _split(CHOICES)
  out = metrics.multiple_choice_scores(hyps, refs)
  assert out["correct"] == correct
  assert out["accuracy"] == pytest.approx(100 * 6 / 9)
  assert (out["examples"], out["unanswered"]) == (9, 2)
  with pytest.raises(ValueError, match="reference 0 has no answer"):
    metrics.multiple_choice_scores(["B"], ["Paris"])


def test_exact_match_hand_counted():
  hyps, refs, correct = _split(EXACT)
  out = metrics.exact_match_scores(hyps, refs)
  assert out["correct"] == correct
  assert out["exact_match"] == pytest.approx(50.0)
  assert (out["examples"], out["unanswered"]) == (6, 1)


def test_scores_for_task_routes_every_type():
  hyps, refs, _ = _split(GSM8K)
  assert metrics.scores_for_task("gsm8k", hyps, refs)["accuracy"] == pytest.approx(62.5)
  hyps, refs, _ = _split(CHOICES)
  assert metrics.scores_for_task("multiple_choice", hyps, refs)["accuracy"] == pytest.approx(
    100 * 6 / 9
  )
  hyps, refs, _ = _split(EXACT)
  assert metrics.scores_for_task("exact_match", hyps, refs)["exact_match"] == pytest.approx(50.0)
  same = ["the cat sat on the mat today", "a dog ran in the park"]
  assert metrics.scores_for_task("translation", same, same)["bleu"] == pytest.approx(100.0)
  assert metrics.scores_for_task("summarization", same, same)["rouge1"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match=r"unknown task type 'f1'.*multiple_choice"):
    metrics.scores_for_task("f1", ["a"], ["a"])


def _config(**data):
  c = config_schema.base_config()
  c.model.kind = "plain"
  c.slm.preset = "t5-small"
  for k, v in data.items():
    c.data[k] = v
  return c


def test_config_accepts_task_types_and_refuses_unknown_ones():
  for task_type in ("translation", "summarization", "exact_match", "gsm8k", "multiple_choice"):
    config_schema.validate(_config(task_type=task_type))
  with pytest.raises(
    ValueError,
    match=r"data.task_type 'mmlu'.*translation, summarization, "
    r"exact_match, gsm8k, multiple_choice",
  ):
    config_schema.validate(_config(task_type="mmlu"))


def test_gsm8k_jsonl_through_the_pipeline_to_scores(tmp_path):
  """As eval.py does it: the config's task_type on the pipeline, the JSONL's answers as
  references, `scores_for_task` on them."""
  rows = [
    {
      "question": "Natalia sold 48 clips in April and half as many in May. How many?",
      "answer": "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72",
    },
    {
      "question": "A farm has 1,000 hens and sells 250. How many are left?",
      "answer": "1000-250 = <<1000-250=750>>750\n#### 750",
    },
    {
      "question": "It is 3 degrees and falls 8. What is it now?",
      "answer": "3-8 = <<3-8=-5>>-5\n#### -5",
    },
    {
      "question": "Tom has 4 bags of 3 apples. How many apples?",
      "answer": "4*3 = <<4*3=12>>12\n#### 12",
    },
  ]
  path = tmp_path / "gsm8k_test.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = _config(
    source="jsonl",
    jsonl_validation=str(path),
    prompt_field="question",
    target_field="answer",
    task_type="gsm8k",
    tokenizer="byt5",
  )
  config_schema.validate(c)
  pipeline = build_pipeline(c.data, model_kind=ENCODER_DECODER, hybrid=False, batch_size=2)
  assert pipeline.task_type == "gsm8k" and pipeline.has_targets("validation")
  source = pipeline.source("validation")
  refs = [source[i]["target"] for i in range(len(source))]
  assert refs == [r["answer"] for r in rows]
  hyps = [
    "24 in May, so 72 in all.",
    "There are 750.0 hens left",
    "It is now 5 degrees.",
    "Tom has 12 apples.\n#### 12",
  ]
  out = metrics.scores_for_task(pipeline.task_type, hyps, refs)
  assert out["correct"] == [True, True, False, True]  # -5 vs 5 is wrong
  assert out["accuracy"] == pytest.approx(75.0)
  assert out["examples"] == 4
