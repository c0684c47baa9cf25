"""Data: TFDS tasks (mocked), JSONL, synthetic task, tokenization, batching, resumption."""

import gzip
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from l2s_jax.config_schema import base_config
from l2s_jax.data import DataError, WorkerError, build_pipeline, loader, tfds as tfds_lib
from l2s_jax.data.synthetic import SyntheticTask, SyntheticTaskConfig
from l2s_jax.data.tokenize import ByteTokenizer, TextTokenizer, load_tokenizer, overlap_matrix


def _cfg(**kw):
  c = base_config().data
  for k, v in kw.items():
    c[k] = v
  return c


# --- TFDS -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(tfds_lib.TASKS))
def test_tfds_tasks_under_mock_data(task):
  tfds = pytest.importorskip("tensorflow_datasets")
  spec = tfds_lib.TASKS[task]
  cfg = _cfg(
    source="tfds",
    tfds_task=task,
    tokenizer="byt5",
    max_prompt_len=64,
    max_target_len=32,
    prompt_buckets=(32, 64),
    target_buckets=(16, 32),
  )
  with tfds.testing.mock_data(num_examples=6):
    p = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=4)
    raw = p.source("validation")
    it = p.iterator("validation", shuffle=False, repeat=False)
    batch = next(it)
    record = tfds.data_source(spec.name, split="validation")[0]
  assert p.task_type == spec.task_type
  assert batch["inputs"].shape[1] in (32, 64) and batch["targets"].shape[1] in (16, 32)
  tok = ByteTokenizer()
  text = record[spec.prompt_key]
  text = text.decode() if isinstance(text, bytes) else text
  expected = tok.encode(spec.prefix + text)[0][:63] + [tok.eos_id]
  n = int(batch["inputs_mask"][0].sum())
  assert batch["inputs"][0, :n].tolist() == expected  # prefixed, byte ids, EOS
  assert (batch["inputs"][0, n:] == 0).all() and (batch["inputs_mask"][0, n:] == 0).all()
  assert raw[0]["prompt"].startswith(spec.prefix)
  t = int(batch["targets_mask"][0].sum())
  assert batch["targets"][0, t - 1] == tok.eos_id
  assert batch["example_index"].tolist() == [0, 1, 2, 3]


def test_tfds_not_prepared_names_the_command(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(
    DataError, match="tfds build wmt16_translate/ro-en --file_format=array_record"
  ):
    tfds_lib.TfdsSource("wmt16_enro", "train", data_dir=str(tmp_path))


# --- JSONL -----------------------------------------------------------------------------------


def _write_jsonl(path, rows, gz=False):
  opener = gzip.open if gz else open
  with opener(path, "wt", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_source_plain_and_gzip(tmp_path, gz):
  """A plain file is read by line offsets, a gzip file whole (evaluation splits only)."""
  path = str(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"))
  _write_jsonl(path, [{"src": "hello world", "tgt": "hallo welt"}, {"src": "a", "tgt": "b"}], gz)
  cfg = _cfg(
    source="jsonl",
    jsonl_validation=path,
    prompt_field="src",
    target_field="tgt",
    tokenizer="byt5",
    prefix="translate: ",
  )
  p = build_pipeline(cfg, model_kind="decoder_only", hybrid=False, batch_size=2)
  assert p.source("validation")[0] == {"prompt": "translate: hello world", "target": "hallo welt"}
  b = next(p.iterator("validation", shuffle=False, repeat=False))
  n_prompt = len("translate: hello world".encode())
  assert b["prompt_lengths"][0] == n_prompt
  assert b["loss_mask"][0].sum() == len("hallo welt") + 1  # target + EOS only
  assert b["loss_mask"][0, :n_prompt].sum() == 0


def test_jsonl_line_index_is_kept_reused_and_rebuilt_when_the_file_changes(tmp_path, caplog):
  """The index sits in the workdir (or beside the file); a later source reuses it without
  reading the file; a file changed since is indexed again, with a warning."""
  from l2s_jax.data.jsonl import JsonlSource, index_path

  path = str(tmp_path / "d.jsonl")
  rows = [{"prompt": f"p{i} " + "é" * i, "target": f"t{i}"} for i in range(50)]
  _write_jsonl(path, rows[:40] + ["", "   "])  # blank lines are not examples
  workdir = tmp_path / "work"
  src = JsonlSource(path, index_dir=str(workdir / "jsonl_index"))
  idx = index_path(path, str(workdir / "jsonl_index"))
  assert os.path.exists(idx + ".npy") and str(workdir) in idx
  assert len(src) == 40 and src[39] == {"prompt": rows[39]["prompt"], "target": "t39"}
  # Reused: a source over the same file reads the index, not the lines.
  os.utime(idx + ".npy")
  before = os.stat(idx + ".npy").st_mtime_ns
  again = JsonlSource(path, index_dir=str(workdir / "jsonl_index"))
  assert os.stat(idx + ".npy").st_mtime_ns == before and again[7] == src[7]
  # Changed: appended lines are found, with a warning.
  _write_jsonl(path, rows)
  with caplog.at_level(logging.WARNING):
    changed = JsonlSource(path, index_dir=str(workdir / "jsonl_index"))
  assert "changed since its line index was built" in caplog.text
  assert len(changed) == 50 and changed[49]["target"] == "t49"
  # Worker processes map the index and read the lines themselves.
  cfg = _cfg(source="jsonl", jsonl_train=path, tokenizer="byt5")
  batches = []
  for workers in (0, 1):
    cfg.workers = workers
    p = build_pipeline(
      cfg, model_kind="encoder_decoder", hybrid=False, batch_size=8, workdir=str(workdir)
    )
    with p.iterator("train", shuffle=True, repeat=True) as it:
      batches.append([next(it) for _ in range(8)])
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  # Without a workdir the index is kept beside the file.
  JsonlSource(path)
  assert os.path.exists(index_path(path, None) + ".npy")
  assert os.path.basename(index_path(path, None)).startswith(".d.jsonl")


def test_gzip_jsonl_is_refused_for_training_with_the_way_out(tmp_path):
  path = str(tmp_path / "d.jsonl.gz")
  _write_jsonl(path, [{"prompt": "a", "target": "b"}], True)
  cfg = _cfg(source="jsonl", jsonl_train=path, tokenizer="byt5")
  p = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=2)
  with pytest.raises(DataError, match=r"d.jsonl.gz' is gzip-compressed.*gunzip -k"):
    p.source("train")


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
  path = str(tmp_path / "bad.jsonl")
  _write_jsonl(
    path,
    [{"prompt": "x", "target": "y"}, "{not json", {"prompt": "x"}, {"prompt": "p", "target": "t"}],
  )
  cfg = _cfg(source="jsonl", jsonl_train=path, tokenizer="byt5")
  p = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=2)
  with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
    p.source("train")
  from l2s_jax.data.jsonl import JsonlSource

  with pytest.raises(DataError, match=r"line 3: no field 'target'"):
    _first_error(path)  # the same file with line 2 repaired
  src = JsonlSource(path, skip_bad_lines=True)
  assert len(src) == 2 and src.skipped == 2


def _first_error(path):
  from l2s_jax.data.jsonl import JsonlSource

  lines = open(path).read().splitlines()
  fixed = str(path) + ".fixed.jsonl"
  with open(fixed, "w") as f:
    f.write(
      "\n".join(
        line if i != 1 else json.dumps({"prompt": "a", "target": "b"})
        for i, line in enumerate(lines)
      )
      + "\n"
    )
  return JsonlSource(fixed)


def test_missing_and_unreadable_files(tmp_path):
  from l2s_jax.data.jsonl import JsonlSource

  with pytest.raises(DataError, match="nope.jsonl' does not exist"):
    JsonlSource(str(tmp_path / "nope.jsonl"))
  broken = tmp_path / "broken.jsonl.gz"
  broken.write_bytes(b"this is not gzip")
  with pytest.raises(DataError, match="cannot read JSONL file"):
    JsonlSource(str(broken))


def test_empty_texts_and_truncation(tmp_path, caplog):
  path = str(tmp_path / "d.jsonl")
  _write_jsonl(path, [{"prompt": "x" * 50, "target": "y" * 40}, {"prompt": "  ", "target": "t"}])
  cfg = _cfg(
    source="jsonl",
    jsonl_train=path,
    tokenizer="byt5",
    max_prompt_len=16,
    max_target_len=8,
    prompt_buckets=(16,),
    target_buckets=(8,),
  )
  p = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=1)
  it = p.iterator("train", shuffle=False, repeat=False)
  with caplog.at_level(logging.WARNING):
    b = next(it)
  assert b["inputs"].shape == (1, 16) and b["inputs"][0, -1] == 1  # cut, EOS kept
  assert b["targets"].shape == (1, 8) and b["targets"][0, -1] == 1
  assert p.featurizer.truncations.prompts == 1 and p.featurizer.truncations.targets == 1
  assert "truncated" in caplog.text
  with pytest.raises(DataError, match="example 1: empty prompt"):
    next(it)


def test_tokenizer_directory_without_fast_tokenizer(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing"))
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "config.json").write_text("{}")
  with pytest.raises(DataError, match="cannot load a tokenizer|not a fast tokenizer"):
    load_tokenizer(str(tmp_path / "tok"))


# --- tokenization and overlap ---------------------------------------------------------------


def _bpe(tmp_path):
  """A small byte-level BPE (GPT-2 style) trained here with `tokenizers`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<pad>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(
    ["the cat sat on the mat", "the dog ate the cat", "naïve café"] * 20, trainer
  )
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
  fast.save_pretrained(str(tmp_path / "bpe"))
  return load_tokenizer(str(tmp_path / "bpe"))


def test_overlap_matrix_byte_vs_bpe(tmp_path):
  bpe, byt = _bpe(tmp_path), ByteTokenizer()
  assert isinstance(bpe, TextTokenizer)
  text = "the cat  naïve"
  b_ids, b_spans = bpe.encode(text)
  y_ids, y_spans = byt.encode(text)
  # Byte tokenizer: one id per UTF-8 byte; "ï" is two bytes of character 11.
  assert len(y_ids) == len(text.encode()) == len(text) + 1
  assert y_spans[11] == y_spans[12] == (11, 12)
  m = overlap_matrix(text, b_spans, y_spans)
  # Hand check: every BPE token overlaps exactly the bytes of its non-space characters.
  char_of_byte = [s for s, _ in y_spans]
  for i, (s, e) in enumerate(b_spans):
    chars = {c for c in range(s, e) if not text[c].isspace()}
    expected = [1.0 if char_of_byte[j] in chars else 0.0 for j in range(len(y_ids))]
    assert m[i].tolist() == expected, (i, text[s:e])
  # The whitespace run "  " belongs to no byte's overlap; the "ï" bytes share one token.
  assert m[:, 7].sum() == 0 and m[:, 8].sum() == 0
  assert m[:, 11].sum() >= 1 and (m[:, 11] == m[:, 12]).all()


def test_overlap_of_hand_made_spans_and_empty_strings():
  text = "ab cd"
  # SLM tokens: "ab", " c", "d";  LLM tokens: "a", "b c", "d", special (empty)
  m = overlap_matrix(text, [(0, 2), (2, 4), (4, 5)], [(0, 1), (1, 4), (4, 5), (0, 0)])
  np.testing.assert_array_equal(m, [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
  assert overlap_matrix("", [], []).shape == (0, 0)
  assert ByteTokenizer().encode("") == ([], [])


def test_hybrid_batches_with_different_tokenizers(tmp_path):
  bpe_dir = str(tmp_path / "bpe")
  _bpe(tmp_path)
  path = str(tmp_path / "d.jsonl")
  _write_jsonl(path, [{"prompt": "the cat sat", "target": "on the mat"}])
  cfg = _cfg(source="jsonl", jsonl_train=path, tokenizer=bpe_dir, llm_tokenizer="byt5")
  p = build_pipeline(cfg, model_kind="decoder_only", hybrid=True, batch_size=2)
  b = next(p.iterator("train", shuffle=False, repeat=False))
  assert not p.shared_tokenizer
  n_llm = len("the cat sat") + 1
  assert b["llm_inputs_mask"][0].sum() == n_llm and b["llm_inputs"][0, n_llm - 1] == 1
  ov = b["overlap"][0]
  assert ov.shape == (b["tokens"].shape[1], b["llm_inputs"].shape[1])
  plen = b["prompt_lengths"][0]
  assert ov[plen:].sum() == 0 and ov[:, n_llm - 1 :].sum() == 0  # no response rows, no EOS
  assert (ov[:plen, : n_llm - 1].sum(0) == [0 if c == " " else 1 for c in "the cat sat"]).all()
  assert (b["overlap"][1] == 0).all() and b["example_index"][1] == -1  # padding row


# --- synthetic task --------------------------------------------------------------------------


def test_synthetic_task_is_deterministic_across_processes():
  code = (
    "from l2s_jax.data.synthetic import *;import json;"
    "t=SyntheticTask(SyntheticTaskConfig(seed=3));"
    "print(json.dumps([t.example('train', i) for i in (0, 5, 999)]))"
  )
  other = json.loads(
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  )
  t = SyntheticTask(SyntheticTaskConfig(seed=3))
  assert other == [t.example("train", i) for i in (0, 5, 999)]
  u = SyntheticTask(SyntheticTaskConfig(seed=4))
  assert [u.example("train", i) for i in range(20)] != [t.example("train", i) for i in range(20)]
  assert t.example("train", 0) != t.example("validation", 0)


def test_synthetic_grammar_rules_hold():
  t = SyntheticTask(
    SyntheticTaskConfig(
      seed=0, p_negation=1.0, p_time_adverb=1.0, p_relative=0.0, p_prepositional=0.0
    )
  )
  lex = t.lex
  for i in range(50):
    ex = t.example("train", i)
    src, tgt = ex["prompt"].split(), ex["target"].split()
    assert tgt[-1] == lex.tgt_neg  # negation moves to the end
    tense = "past" if src[0] == "yesterday" else "future"
    assert tgt[0] == lex.tgt_time[tense]
    neg = src.index(lex.src_neg)
    plural = src[neg - 1] == "-s"  # the subject's number
    noun = lex.src_nouns.index(src[neg - 2] if plural else src[neg - 1])
    verb = lex.src_verbs.index(src[neg + 1])
    assert src[neg + 2] == {"past": "-ed", "future": "-ll"}[tense]
    # The main verb comes last (before the negation), agreeing with the subject.
    assert tgt[-4:-1] == [
      lex.tgt_verbs[verb],
      "-n" if plural else "-t",
      {"past": "-te", "future": "-wa"}[tense],
    ]
    assert tgt[1] in (lex.tgt_det[(d, int(lex.gender[noun]), int(plural))] for d in (0, 1))
    assert tgt[2] == lex.tgt_nouns[noun]


# --- iteration ------------------------------------------------------------------------------


def _synthetic_pipeline(batch=8, **kw):
  cfg = _cfg(**kw)
  cfg.synthetic.num_train = 100
  return build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=batch)


def test_resume_mid_epoch_gives_the_same_batches():
  p = _synthetic_pipeline()
  it = p.iterator("train", shuffle=True, repeat=True)
  reference = [next(it) for _ in range(30)]  # crosses two epoch boundaries
  it2 = p.iterator("train", shuffle=True, repeat=True)
  for _ in range(11):
    next(it2)
  state = json.loads(json.dumps(it2.get_state()))  # as the checkpoint stores it
  it3 = p.iterator("train", shuffle=True, repeat=True)
  it3.set_state(state)
  for k in range(11, 30):
    got = next(it3)
    for key in reference[k]:
      np.testing.assert_array_equal(got[key], reference[k][key])
  epoch0 = np.concatenate([b["example_index"] for b in reference[:13]])[:100]
  assert sorted(epoch0.tolist()) == list(range(100))  # a permutation of the split


def test_worker_processes_give_the_in_process_batches_and_resume_among_them():
  """data.workers=2 builds the batches in two Grain worker processes: the same batches as in
  process, and a state taken from one resumes on the other exactly."""
  p0 = _synthetic_pipeline(workers=0)
  reference = [
    next(it) for it in [p0.iterator("train", shuffle=True, repeat=True)] for _ in range(15)
  ]
  p2 = _synthetic_pipeline(workers=2, prefetch=3)
  with p2.iterator("train", shuffle=True, repeat=True) as it:
    got = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(it.get_state()))
  with p0.iterator("train", shuffle=True, repeat=True) as it0:
    it0.set_state(state)  # from 2 workers to none
    got += [next(it0) for _ in range(4)]
    state = it0.get_state()
  with p2.iterator("train", shuffle=True, repeat=True) as it:
    it.set_state(state)  # and back
    got += [next(it) for _ in range(4)]
  for k, (a, b) in enumerate(zip(got, reference, strict=True)):
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {k} {key}")


@pytest.mark.parametrize("error", [False, True])
def test_a_dying_worker_stops_the_iteration_with_its_error(error):
  """A worker killed outright (SIGKILL) or failing on an example: next() raises, naming it,
  within the test's time (never a hang)."""
  import train_fixtures as fx

  p = _synthetic_pipeline(workers=2)
  p._sources["train"] = fx.DyingSource(p.source("train"), at=37, error=error)
  it = p.iterator("train", shuffle=False, repeat=True)
  expected = (
    (DataError, "example 37: a bad example") if error else (WorkerError, "worker process died")
  )
  with pytest.raises(expected[0], match=expected[1]):
    for _ in range(20):  # 8 examples a batch: example 37 is in batch 4
      next(it)
  it.close()


def test_worker_counts_beyond_the_machine_are_capped_with_a_warning(caplog):
  cores = loader.usable_cores()
  with caplog.at_level(logging.WARNING):
    assert loader.capped_workers(-1) == 0
    assert loader.capped_workers(cores + 5) == cores
    assert loader.capped_workers(cores) == cores
  assert "data.workers=-1 is negative" in caplog.text
  assert f"data.workers={cores + 5} is more than the {cores} cores" in caplog.text


def test_a_data_position_from_before_grain_restarts_the_data_with_a_warning(caplog):
  p = _synthetic_pipeline()
  first = next(p.iterator("train", shuffle=True, repeat=True))
  it = p.iterator("train", shuffle=True, repeat=True)
  with caplog.at_level(logging.WARNING):
    it.set_state({"epoch": 1, "position": 40, "seed": 0})  # what earlier versions saved
  assert "written by an older l2s-jax" in caplog.text and "starts again" in caplog.text
  np.testing.assert_array_equal(next(it)["example_index"], first["example_index"])


def _process_pipelines(cfg, batch_size, hybrid=False):
  """The pipelines of processes 0 and 1 of a two-process job (`batch_size` rows each)."""
  return [
    build_pipeline(
      cfg,
      model_kind="encoder_decoder",
      hybrid=hybrid,
      batch_size=batch_size,
      process_index=proc,
      process_count=2,
    )
    for proc in range(2)
  ]


def test_two_processes_see_disjoint_examples_covering_the_split():
  cfg = _cfg()
  cfg.synthetic.num_validation = 37
  seen = []
  for p in _process_pipelines(cfg, 8):
    idx = np.concatenate(
      [b["example_index"] for b in p.iterator("validation", shuffle=True, repeat=False)]
    )
    seen.append(set(idx[idx >= 0].tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(37))


def test_padding_rows_have_zero_masks_and_the_count_is_exact():
  cfg = _cfg()
  cfg.synthetic.num_validation = 13
  p = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=8)
  batches = list(p.iterator("validation", shuffle=False, repeat=False))
  assert len(batches) == 2
  last = batches[-1]
  pad = last["example_index"] == -1
  assert pad.sum() == 3 and last["inputs_mask"][pad].sum() == 0
  assert last["targets_mask"][pad].sum() == 0


def test_distinct_shapes_are_bounded_by_the_buckets():
  cfg = _cfg(prompt_buckets=(8, 16, 32), target_buckets=(8, 16, 32))
  cfg.synthetic.num_train = 400
  p = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=True, batch_size=4)
  shapes = {
    tuple((k, v.shape) for k, v in sorted(b.items()))
    for b in p.iterator("train", shuffle=True, repeat=False)
  }
  assert 1 < len(shapes) <= 3 * 3
  p2 = build_pipeline(cfg, model_kind="decoder_only", hybrid=False, batch_size=4)
  shapes2 = {b["tokens"].shape for b in p2.iterator("train", shuffle=True, repeat=False)}
  assert len(shapes2) <= len({a + b for a in (8, 16, 32) for b in (8, 16, 32)})


def test_a_position_saved_by_one_process_resumes_on_two():
  """The saved position counts global batches: one process's state, given to two processes
  (half the rows each), continues with exactly the examples the one process would see next."""
  cfg = _cfg()
  cfg.synthetic.num_train = 50
  one = build_pipeline(cfg, model_kind="encoder_decoder", hybrid=False, batch_size=8)
  it = one.iterator("train", shuffle=True, repeat=True)
  for _ in range(5):  # into the second epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["example_index"] for _ in range(6)]
  halves = []
  for p in _process_pipelines(cfg, 4):
    p.agree_lengths = lambda mine: mine  # widths play no part here
    with p.iterator("train", shuffle=True, repeat=True) as local:
      local.set_state(state)
      halves.append([next(local)["example_index"] for _ in range(6)])
  for k, whole in enumerate(expected):
    np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), whole, err_msg=k)


def test_processes_batches_stack_into_the_one_process_batch():
  """Process p of P returns rows p*b .. (p+1)*b - 1 of each global batch: stacked in process
  order, with widths agreed through `agree_lengths` (here: the maximum, computed by hand over
  both simulated processes), the batches are exactly one process's batches, to the last
  (partial) one, and every process stops at the same batch."""
  cfg = _cfg(prompt_buckets=(8, 16, 32, 64), target_buckets=(8, 16, 32, 64))
  cfg.synthetic.num_validation = 37
  single = list(
    build_pipeline(cfg, model_kind="encoder_decoder", hybrid=True, batch_size=8).iterator(
      "validation", shuffle=True, repeat=False
    )
  )
  local = _process_pipelines(cfg, 4, hybrid=True)
  # Each process's longest sequences, per batch, as the collective would see them.
  lengths = [
    [
      p.padder.lengths(
        [p.featurizer(p.source("validation")[int(i)], int(i)) for i in b["example_index"] if i >= 0]
      )
      for b in p.iterator("validation", shuffle=True, repeat=False)
    ]
    for p in local
  ]
  assert len(lengths[0]) == len(lengths[1]) == len(single) == 5
  agreed = [{k: max(a[k], b[k]) for k in a} for a, b in zip(*lengths)]
  batches = []
  for p in local:
    calls = iter(agreed)
    p.agree_lengths = lambda mine, calls=calls: next(calls)
    batches.append(list(p.iterator("validation", shuffle=True, repeat=False)))
  for n, whole in enumerate(single):
    for key, value in whole.items():
      np.testing.assert_array_equal(
        np.concatenate([batches[0][n][key], batches[1][n][key]]), value, err_msg=f"batch {n} {key}"
      )
  # The last global batch holds 5 examples: 4 on process 0, 1 and 3 padding rows on process 1.
  assert (batches[0][-1]["example_index"] >= 0).sum() == 4
  assert (batches[1][-1]["example_index"] >= 0).sum() == 1
