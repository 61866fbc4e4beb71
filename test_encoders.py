# Issue 10 (and issue 9 point 5): any encoder with a fast tokenizer (the tokenizer's own pair
# template, token types only where the model has several), the tiny XLM-R beside the tiny BERT,
# --max-query-length, --precision, bad model directories, and CUDA-only checks.
# Helpers shared with the other sections are imported from test_all.py.
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import common
import distill
import evaluate_mlqa
import train_qa as qa
from common import load_squad_examples
from test_all import (XQUAD_DIR, _distill_main, _distill_mlqa_dir, _distill_same, _distill_state,
                      _distill_weights, _qa_overflow_windows, qa_f1, qa_one_thread, qa_run_cli,  # noqa: F401
                      qa_synthetic, qa_texts)

ENC_ROOT = os.path.dirname(os.path.abspath(__file__))
ENC_LANGS = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]
ENC_EN = os.path.join(XQUAD_DIR, "xquad.en.json")
ENC_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def enc_examples(lang, n=None):
    return load_squad_examples(os.path.join(XQUAD_DIR, f"xquad.{lang}.json"))[:n]


def enc_exit(main, argv, capsys):
    """A script's main(argv) as its command line runs it -> (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------ pair templates and windows
def test_enc_pair_template_of_bert_and_xlmr():
    texts = qa_texts(enc_examples("en", 20))
    bert, xlmr = qa.train_tiny_tokenizer(texts), qa.train_tiny_xlmr_tokenizer(texts)
    t = qa.pair_template(bert)
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert [x.tolist() for x in t["prefix"] + t["middle"] + t["suffix"]] == [[cls], [0], [sep], [0], [sep], [1]]
    assert (t["question_type"], t["context_type"]) == (0, 1)
    t = qa.pair_template(xlmr)
    bos, eos = xlmr.convert_tokens_to_ids(["<s>", "</s>"])
    assert [x.tolist() for x in t["prefix"] + t["middle"] + t["suffix"]] == \
        [[bos], [0], [eos, eos], [0, 0], [eos], [0]]                # <s> q </s></s> c </s>
    assert (t["question_type"], t["context_type"]) == (0, 0)
    assert xlmr.pad_token_id == 1 and xlmr.cls_token_id == bos     # XLM-R's numbering


@pytest.mark.parametrize("lang", ENC_LANGS)
def test_enc_xlmr_windows_equal_the_tokenizers_overflow_windows(lang):
    """The tiny XLM-R's windows are the fast tokenizer's own overflow windows (ids, offsets,
    context positions, example mapping) and its gold spans map back to the answers."""
    ex = enc_examples(lang)
    tok = qa.train_tiny_xlmr_tokenizer(qa_texts(ex))
    for max_length, stride in ((384, 128), (128, 32)):
        ours = qa.build_features(ex, tok, max_length, stride, max_query_length=None)
        ref = list(_qa_overflow_windows(ex, tok, max_length, stride))
        assert len(ref) == len(ours["input_ids"])
        first_window = np.r_[True, np.diff(ours["example_index"]) != 0]
        for f, (sample, ids, types_, ctx, offsets) in enumerate(ref):
            assert ours["example_index"][f] == sample
            assert ours["input_ids"][f].tolist() == ids
            assert (ours["allowed"][f][1:] == ctx[1:]).all() and ours["allowed"][f][0]
            assert (ours["offsets"][f] == offsets).all()
            # the template's token types (all 0); `tokenizers` (0.20-0.23) gives the context of
            # a pair's later overflow windows type 1 whatever the template: a model with one
            # token type is never given them (qa.takes_token_types)
            assert ours["token_type_ids"][f].tolist() == (types_ if first_window[f] else [0] * len(ids))
    feats = qa.build_features(ex, tok)
    held = np.nonzero(feats["start_positions"] > 0)[0]
    assert len(np.unique(feats["example_index"][held])) == len(ex)   # every answer in a window
    exact = 0
    for f in held:
        e, off = ex[feats["example_index"][f]], feats["offsets"][f]
        text = e["context"][off[feats["start_positions"][f], 0]:off[feats["end_positions"][f], 1]]
        assert e["answers"][0]["text"] in text
        exact += text == e["answers"][0]["text"]
    assert exact / len(held) > 0.95


def test_enc_xlm_roberta_tokenizer_class_windows_and_predictions(tmp_path):
    """A directory laid out like xlm-roberta-base (a SentencePiece Unigram vocabulary, tokenizer_class
    XLMRobertaTokenizer, XLMRobertaForQuestionAnswering) loads with transformers' own XLM-R tokenizer
    class; its windows are that tokenizer's overflow windows and the answers context substrings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    ex = enc_examples("de", 300)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    tok.train_from_iterator(qa_texts(ex), trainers.UnigramTrainer(
        vocab_size=2000, special_tokens=qa.XLMR_SPECIAL_TOKENS, unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    path = tmp_path / "xlmr"
    qa.build_tiny_model("tiny-xlmr", fast).save_pretrained(path)
    fast.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="XLMRobertaTokenizer")))
    model, tokenizer = qa.load_model_and_tokenizer(str(path))
    assert type(tokenizer).__name__.startswith("XLMRobertaTokenizer") and tokenizer.is_fast
    ours = qa.build_features(ex, tokenizer, 128, 32)
    ref = list(_qa_overflow_windows(ex, tokenizer, 128, 32))
    assert len(ref) == len(ours["input_ids"])
    for f, (sample, ids, _, ctx, offsets) in enumerate(ref):
        assert ours["example_index"][f] == sample and ours["input_ids"][f].tolist() == ids
        assert (ours["allowed"][f][1:] == ctx[1:]).all() and (ours["offsets"][f] == offsets).all()
    pred = qa.predict(model, tokenizer, ex[:40], device="cpu")
    assert all(pred[e["id"]] and pred[e["id"]] in e["context"] for e in ex[:40])


def test_enc_tiny_xlmr_tokenizer_is_a_function_of_the_text():
    texts = qa_texts(enc_examples("de", 200) + enc_examples("zh", 200))
    a, b = qa.train_tiny_xlmr_tokenizer(texts), qa.train_tiny_xlmr_tokenizer(list(reversed(texts)) + texts)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


@pytest.mark.parametrize("name", qa.TINY_MODELS)
def test_enc_predictions_are_context_substrings_in_every_language(name):
    examples = [dict(ex, id=f"{lang}-{ex['id']}") for lang in ENC_LANGS for ex in enc_examples(lang, 15)]
    model, tok = qa.load_model_and_tokenizer(name, texts=qa_texts(examples), seed=0)
    pred = qa.predict(model, tok, examples, device="cpu")
    assert set(pred) == {ex["id"] for ex in examples}
    for ex in examples:
        assert pred[ex["id"]] and pred[ex["id"]] in ex["context"], (ex["id"], pred[ex["id"]])
        assert pred[ex["id"]] == pred[ex["id"]].strip()       # offsets never include the spaces


def test_enc_token_types_only_for_models_that_have_several():
    ex = enc_examples("en", 12)
    bert, bert_tok = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
    xlmr, xlmr_tok = qa.load_model_and_tokenizer("tiny-xlmr", texts=qa_texts(ex), seed=0)
    assert qa.takes_token_types(bert) and not qa.takes_token_types(xlmr)
    assert xlmr.config.type_vocab_size == 1
    assert xlmr.config.max_position_embeddings >= qa.MAX_LENGTH + xlmr.config.pad_token_id + 1
    feats = qa.build_features(ex, xlmr_tok)
    batch = qa.collate(feats, list(range(8)), xlmr_tok.pad_token_id, "cpu")
    xlmr.eval()
    with torch.no_grad():
        start, end = qa.qa_logits(xlmr, batch)
        ones = dict(batch, token_type_ids=torch.ones_like(batch["token_type_ids"]))
        assert torch.equal(qa.qa_logits(xlmr, ones)[0], start)   # not passed: would be out of range
        # padding rows: RoBERTa position ids count from the pad id, logits do not depend on padding
        alone = qa.collate(feats, [0], xlmr_tok.pad_token_id, "cpu")
        n = len(feats["input_ids"][0])
        torch.testing.assert_close(qa.qa_logits(xlmr, alone)[0][0], start[0, :n], atol=1e-5, rtol=1e-5)
    bert.eval()
    bert_feats = qa.build_features(ex, bert_tok)
    b = qa.collate(bert_feats, list(range(8)), bert_tok.pad_token_id, "cpu")
    assert b["token_type_ids"].any()
    with torch.no_grad():             # BERT's token types matter: they are passed
        zeros = dict(b, token_type_ids=torch.zeros_like(b["token_type_ids"]))
        assert not torch.equal(qa.qa_logits(bert, zeros)[0], qa.qa_logits(bert, b)[0])


def enc_learn_synthetic_task(name, precision, epochs=10):
    """Phase 1 of a tiny model on the synthetic task (test_all.qa_synthetic) -> held-out F1 before
    and after training, and the trained model."""
    train, held_out = qa_synthetic(1500, seed=0), qa_synthetic(200, seed=1)
    model, tokenizer = qa.load_model_and_tokenizer(name, texts=qa_texts(train), seed=0)
    feats = qa.build_features(train, tokenizer)

    def held_out_f1(model):
        pred = qa.predict(model, tokenizer, held_out, device="cpu", precision=precision)
        return np.mean([qa_f1(pred[ex["id"]], ex["answers"][0]["text"]) for ex in held_out])
    before = held_out_f1(model)
    model = qa.train(model, feats, tokenizer.pad_token_id, epochs=epochs, lr=1e-3, batch_size=32, seed=0,
                     warmup_steps=50, progress=False, precision=precision)
    return before, held_out_f1(model), model


def test_enc_tiny_xlmr_learns_synthetic_task(qa_one_thread):
    f1_before, f1, _ = enc_learn_synthetic_task("tiny-xlmr", "auto")
    assert f1_before < 0.5 and f1 > 0.9, (f1_before, f1)


# ------------------------------------------------------------------ --max-query-length
def enc_long_question_example():
    ex = enc_examples("en", 1)[0]
    words = " ".join(f"word{i % 50}" for i in range(400))
    return dict(ex, id="long-question", question=f"{words} {ex['question']}")


def test_enc_long_question_is_truncated_to_max_query_length():
    long_ex, short = enc_long_question_example(), enc_examples("en", 3)
    tok = qa.train_tiny_tokenizer(qa_texts(short + [long_ex]))
    q_len = len(tok(long_ex["question"], add_special_tokens=False)["input_ids"])
    assert q_len > 400
    feats = qa.build_features(short + [long_ex], tok)
    t = qa.pair_template(tok)
    for f in np.nonzero(feats["example_index"] == 3)[0]:
        question = feats["input_ids"][f][len(t["prefix"][0]):][:qa.MAX_QUERY_LENGTH]
        first_64 = tok(long_ex["question"], add_special_tokens=False)["input_ids"][:qa.MAX_QUERY_LENGTH]
        assert question.tolist() == first_64                          # its first 64 tokens
        head = len(t["prefix"][0]) + qa.MAX_QUERY_LENGTH + len(t["middle"][0])
        assert feats["allowed"][f][head] and not feats["allowed"][f][head - 1]
    short_feats = qa.build_features(short, tok)                        # other examples unchanged
    assert all((a == b).all() for a, b in zip(short_feats["input_ids"], feats["input_ids"]))
    feats16 = qa.build_features([long_ex], tok, max_query_length=16)
    head16 = len(t["prefix"][0]) + 16 + len(t["middle"][0])
    assert np.nonzero(feats16["allowed"][0][1:])[0][0] + 1 == head16    # the context starts after 16
    # a question that leaves no context token in the window is still an error, naming the options
    with pytest.raises(common.InputError, match="--max-query-length 64.*--max-length 60, none"):
        qa.build_features([long_ex], tok, max_length=60, stride=10)
    with pytest.raises(common.InputError, match="--max-query-length None.*--max-length 384, none"):
        qa.build_features([long_ex], tok, max_query_length=None)
    with pytest.raises(common.InputError, match="not more than --stride 100"):
        qa.build_features([long_ex], tok, max_length=160, stride=100)
    model = qa.build_tiny_model("tiny", tok)
    pred = qa.predict(model, tok, short + [long_ex], device="cpu")
    assert isinstance(pred["long-question"], str) and pred["long-question"] in long_ex["context"]


def test_enc_long_question_evaluation_and_phase_1_exit_0(tmp_path, qa_one_thread):
    long_ex, short = enc_long_question_example(), enc_examples("en", 4)
    dataset = tmp_path / "long.json"
    common.atomic_write_json(str(dataset), common.examples_to_squad(short + [long_ex]))
    model_dir, out = tmp_path / "model", tmp_path / "out"
    # phase 1 trains on it (the question cut to its first tokens)
    qa.main(["--model", "tiny-xlmr", "--train-file", str(dataset), "--epochs", "1", "--batch-size", "4",
             "--output-dir", str(model_dir), "--max-query-length", "32"])
    proc = subprocess.run([sys.executable, "evaluate_mlqa.py", "--model", str(model_dir), "--output-dir",
                           str(out), "--skip", "mlqa", "xquad", "tydiqa", "--dataset", str(dataset),
                           "--squad"], cwd=ENC_ROOT, env=ENC_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = json.loads((out / "predictions" / "long.json").read_text())
    assert isinstance(pred["long-question"], str) and pred["long-question"] in long_ex["context"]
    assert json.loads((out / "metrics.json").read_text())["long"]["n"] == 5


# ------------------------------------------------------------------ --precision
def test_enc_precision_auto_is_fp32_on_a_cpu_and_bf16_is_close():
    """bf16 autocast on a CPU: logits within 0.05 and the loss within 1% of fp32 on the same batch
    (stated tolerance; measured ~0.003 and ~0.01% on the tiny models); auto = fp32, bitwise."""
    ex = enc_examples("en", 40)
    for name in qa.TINY_MODELS:
        model, tok = qa.load_model_and_tokenizer(name, texts=qa_texts(ex), seed=0)
        model.eval()
        feats = qa.build_features(ex, tok)
        batch = qa.collate(feats, list(range(16)), tok.pad_token_id, "cpu")
        with torch.no_grad():
            losses = {}
            for precision in qa.PRECISIONS:
                start, end = qa.qa_logits(model, batch, precision)
                losses[precision] = (start, qa.ce_loss(start, end, batch["start_positions"],
                                                       batch["end_positions"]))
        assert torch.equal(losses["auto"][0], losses["fp32"][0])
        allowed = batch["allowed"]
        assert not torch.equal(losses["bf16"][0], losses["fp32"][0])        # autocast did act
        assert (losses["bf16"][0] - losses["fp32"][0])[allowed].abs().max() < 0.05
        assert abs(losses["bf16"][1] - losses["fp32"][1]) < 0.01 * losses["fp32"][1], name
    with pytest.raises(common.InputError, match="--precision"):
        qa.autocast("cpu", "fp16")


def test_enc_training_under_bf16_still_learns(qa_one_thread):
    f1_before, f1, model = enc_learn_synthetic_task("tiny", "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())      # weights stay fp32
    assert f1_before < 0.5 and f1 > 0.9, (f1_before, f1)


def test_enc_bench_bf16_rows(capsys):
    bench.main(["--quick", "--shape", "tiny", "--steps", "1", "--reps", "1", "--eval-examples", "16",
                "--batch-size", "8", "--json", "--device", "cpu", "--precision", "bf16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ours_precision"] == "fp32"
    for part in ("train", "eval"):
        r = result[part]
        assert r["ours_fps"] > 0 and r["ours_bf16_fps"] > 0 and r["reference_fps"] > 0
        assert abs(r["bf16_over_fp32"] - r["ours_bf16_fps"] / r["ours_fps"]) < 0.02
        assert abs(r["bf16_speedup"] - r["ours_bf16_fps"] / r["reference_fps"]) < 0.02
    assert 0.0 <= result["eval"]["bf16_same_answers"] <= 1.0


# ------------------------------------------------------------------ the tiny XLM-R end to end
def test_enc_train_qa_cli_tiny_xlmr_writes_a_loadable_directory(tmp_path, qa_one_thread):
    out = str(tmp_path / "model")
    proc = subprocess.run([sys.executable, "train_qa.py", "--model", "tiny-xlmr", "--train-file", ENC_EN,
                           "--epochs", "1", "--max-examples", "40", "--batch-size", "8", "--output-dir",
                           out, "--precision", "bf16"], cwd=ENC_ROOT, env=ENC_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    model, tokenizer = AutoModelForQuestionAnswering.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "XLMRobertaForQuestionAnswering" and tokenizer.is_fast
    assert model.config.type_vocab_size == 1 and "token_type_ids" not in tokenizer.model_input_names
    assert json.loads((tmp_path / "model" / "train_args.json").read_text())["precision"] == "bf16"
    enc = tokenizer("Who?", "Bob went.")
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"])[:1] == ["<s>"]
    assert enc["input_ids"].count(tokenizer.sep_token_id) == 3          # <s> q </s></s> c </s>
    ex = enc_examples("en", 5)
    pred = qa.predict(model, tokenizer, ex, device="cpu")
    assert all(pred[e["id"]] in e["context"] for e in ex)


@pytest.fixture(scope="module")
def enc_distill_runs(tmp_path_factory):
    """distill.py --model tiny-xlmr --ntl 1 --t 2 --map-k --max-examples 60 --epochs 2: one
    uninterrupted run, and one stopped after epoch 1 and resumed (MLQA dev: a small lookalike)."""
    root = tmp_path_factory.mktemp("enc_distill")
    mlqa = _distill_mlqa_dir(str(root / "mlqa"))
    argv = ["--model", "tiny-xlmr", "--ntl", "1", "--t", "2", "--map-k", "--max-examples", "60",
            "--epochs", "2", "--mlqa-dir", mlqa]
    full, part = str(root / "full"), str(root / "part")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _distill_main(argv + ["--output-dir", full])[0] == 0
        assert _distill_main(argv + ["--output-dir", part, "--stop-after-epoch", "1"])[0] == 0
        assert _distill_main(argv + ["--output-dir", part, "--resume"])[0] == 0
    finally:
        torch.set_num_threads(n)
    return {"root": root, "full": full, "part": part}


def test_enc_distill_tiny_xlmr_resume_equals_uninterrupted(enc_distill_runs):
    full, part = enc_distill_runs["full"], enc_distill_runs["part"]
    a, b = _distill_state(full), _distill_state(part)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] > 0
    assert _distill_same(a["student"], b["student"]) and _distill_same(a["teacher"], b["teacher"])
    assert _distill_same(_distill_weights(full), _distill_weights(part))
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    model = AutoModelForQuestionAnswering.from_pretrained(full)
    assert type(model).__name__ == "XLMRobertaForQuestionAnswering"
    assert AutoTokenizer.from_pretrained(full).is_fast
    rows = distill.read_log(os.path.join(full, "train_log.jsonl"))
    assert rows and all(0.0 <= r["alpha"] <= 1.0 for r in rows)


def test_enc_evaluate_tiny_xlmr_model(enc_distill_runs):
    root = enc_distill_runs["root"]
    xquad = root / "xquad"
    for lang in common.XQUAD_ZERO_SHOT:
        common.atomic_write_json(str(xquad / f"xquad.{lang}.json"),
                                 common.examples_to_squad(enc_examples(lang, 6)))
    out = root / "eval"
    common.run_main(lambda: evaluate_mlqa.main(["--model", enc_distill_runs["full"], "--output-dir", str(out),
                                                "--skip", "mlqa", "tydiqa", "--xquad-dir", str(xquad)]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["xquad"]["pairs"]) == {f"{l}-{l}" for l in common.XQUAD_ZERO_SHOT}
    for lang in common.XQUAD_ZERO_SHOT:
        pred = json.loads((out / "predictions" / "xquad" / f"{lang}-{lang}.json").read_text())
        contexts = {ex["id"]: ex["context"] for ex in enc_examples(lang, 6)}
        assert set(pred) == set(contexts) and all(pred[i] in contexts[i] for i in pred)


# ------------------------------------------------------------------ bad model directories
def enc_bad_model_dirs(tmp_path):
    """A BERT QA model whose tokenizer is not fast (CANINE's has no fast class), and a model type
    without a question-answering head class (bert-generation), both built offline."""
    from transformers import BertGenerationConfig, BertGenerationEncoder, CanineTokenizer
    ex = enc_examples("en", 4)
    model, tok = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
    slow = tmp_path / "slow_tokenizer"
    model.save_pretrained(slow)
    CanineTokenizer().save_pretrained(slow)
    no_head = tmp_path / "no_qa_head"
    BertGenerationEncoder(BertGenerationConfig(vocab_size=len(tok), **qa.TINY_CONFIG)).save_pretrained(no_head)
    tok.save_pretrained(no_head)
    return {str(slow): "not a fast tokenizer", str(no_head): "'bert-generation' has no question-answering head"}


def test_enc_slow_tokenizer_or_no_qa_head_exit_2_one_line(tmp_path, capsys):
    cases = enc_bad_model_dirs(tmp_path)
    capsys.readouterr()                      # transformers 5's save progress bars
    for path, needle in cases.items():
        code, err = enc_exit(qa.main, ["--model", path, "--train-file", ENC_EN, "--max-examples", "4",
                                       "--output-dir", str(tmp_path / "out")], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
        assert path in err[0] and needle in err[0], err
        code, err = enc_exit(evaluate_mlqa.main, ["--model", path, "--output-dir", str(tmp_path / "eval"),
                                                  "--skip", "mlqa", "tydiqa"], capsys)
        assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()
    slow = next(iter(cases))                 # as a command: one line, no traceback
    proc = subprocess.run([sys.executable, "evaluate_mlqa.py", "--model", slow, "--output-dir",
                           str(tmp_path / "eval"), "--skip", "mlqa", "tydiqa"], cwd=ENC_ROOT, env=ENC_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------ CUDA (where a GPU is present)
@needs_cuda
def test_cuda_bf16_loss_agrees_with_fp32():
    ex = enc_examples("en", 40)
    for name in qa.TINY_MODELS:
        model, tok = qa.load_model_and_tokenizer(name, texts=qa_texts(ex), seed=0)
        model.to("cuda").eval()
        batch = qa.collate(qa.build_features(ex, tok), list(range(16)), tok.pad_token_id, "cuda")
        with torch.no_grad():
            loss = {}
            for precision in qa.PRECISIONS:
                start, end = qa.qa_logits(model, batch, precision)
                loss[precision] = qa.ce_loss(start, end, batch["start_positions"], batch["end_positions"])
        assert torch.equal(loss["auto"], loss["bf16"])                    # auto = bf16 on CUDA
        assert abs(loss["bf16"] - loss["fp32"]) < 0.01 * loss["fp32"], (name, loss)


@needs_cuda
def test_cuda_fused_adamw_step_equals_the_loop():
    ex = enc_examples("en", 8)
    model, tok = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
    model.to("cuda")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    fused = qa.make_optimizer(model, 1e-3, 0.01)
    assert fused.defaults["fused"]
    batch = qa.collate(qa.build_features(ex, tok), list(range(8)), tok.pad_token_id, "cuda")
    qa.ce_loss(*qa.qa_logits(model, batch, "fp32"), batch["start_positions"], batch["end_positions"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    fused.step()
    fused_weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(reference)
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in fused.param_groups]
    torch.optim.AdamW(groups, lr=1e-3, fused=False, foreach=False).step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, fused_weights[k], atol=1e-6, rtol=1e-5)
    assert not torch.equal(fused_weights["qa_outputs.weight"], reference["qa_outputs.weight"])


@needs_cuda
def test_cuda_resume_equals_uninterrupted_within_bf16_noise(tmp_path):
    argv = ["--model", "tiny", "--ntl", "1", "--t", "2", "--map-k", "--max-examples", "60", "--epochs", "2",
            "--mlqa-dir", _distill_mlqa_dir(str(tmp_path / "mlqa"))]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert _distill_main(argv + ["--output-dir", full])[0] == 0
    assert _distill_main(argv + ["--output-dir", part, "--stop-after-epoch", "1"])[0] == 0
    assert _distill_main(argv + ["--output-dir", part, "--resume"])[0] == 0
    a, b = _distill_weights(full), _distill_weights(part)
    assert a.keys() == b.keys()
    for k in a:                       # same seed: equal up to bf16 / atomic-add noise
        torch.testing.assert_close(a[k], b[k], atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_two_process_nccl(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_qa.py", "--model", "tiny", "--train-file", ENC_EN, "--epochs", "1", "--max-examples", "32",
           "--batch-size", "8", "--output-dir", out]
    r = subprocess.run(cmd, cwd=ENC_ROOT, env=ENC_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device cuda:0 x 2" in r.stdout and r.stdout.count("saved ") == 1
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))


@needs_cuda
def test_cuda_bench_mbert_base_reports_mfu_and_peak_memory():
    proc = subprocess.run([sys.executable, "bench.py", "--shape", "mbert-base", "--json", "--steps", "4",
                           "--reps", "2", "--eval-examples", "300"], cwd=ENC_ROOT, env=ENC_ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))                               # the figures, with pytest -s
    assert result["shape"] == "mbert-base" and result["ours_precision"] == "bf16 autocast"
    assert 0 < result["train"]["ours_mfu"] < 1 and result["train"]["ours_peak_mem_gib"] > 0
    assert result["eval"]["ours_peak_mem_gib"] > 0 and result["train"]["speedup"] > 0
