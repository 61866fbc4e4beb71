"""Tests of train_qa.py (phase 1): features and offsets, batching, masking, answer extraction,
learning, the command line. Offline and CPU only (`--model tiny`)."""
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import train_qa as qa
from common import load_squad_examples

QA_ROOT = os.path.dirname(os.path.abspath(__file__))
QA_XQUAD = os.path.join(QA_ROOT, "data", "xquad")
QA_EN = os.path.join(QA_XQUAD, "xquad.en.json")


def qa_texts(examples):
    return [x for ex in examples for x in (ex["question"], ex["context"])]


@pytest.fixture
def qa_one_thread():
    """One intra-op thread: on a small shared CPU this is faster and keeps runs repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ features and offsets
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(QA_XQUAD, "xquad.*.json"))),
                         ids=lambda p: p.split(".")[-2])
def test_qa_offsets_recover_gold_answer_every_language(path):
    examples = load_squad_examples(path)
    tokenizer = qa.train_tiny_tokenizer(qa_texts(examples))
    feats = qa.build_features(examples, tokenizer)
    held_by_example = np.zeros(len(examples), dtype=bool)
    exact = 0
    for f in range(len(feats["input_ids"])):
        ex = examples[feats["example_index"][f]]
        ans = ex["answers"][0]
        s_char, e_char = ans["answer_start"], ans["answer_start"] + len(ans["text"])
        off, allowed = feats["offsets"][f], feats["allowed"][f]
        ctx = np.nonzero(allowed[1:])[0] + 1
        inside = off[ctx[0], 0] <= s_char and e_char <= off[ctx[-1], 1]
        s, e = feats["start_positions"][f], feats["end_positions"][f]
        assert allowed[0] and not allowed[1]                  # [CLS] allowed, question not
        if not inside:                                        # window without the answer -> [CLS]
            assert s == e == 0
            continue
        assert 0 < s <= e and allowed[s] and allowed[e]
        text = ex["context"][off[s, 0]:off[e, 1]]
        assert ans["text"] in text, (ex["id"], ans["text"], text)
        exact += text == ans["text"]
        held_by_example[feats["example_index"][f]] = True
    assert held_by_example.all()                              # every example has a window with it
    assert exact / held_by_example.sum() > 0.95


def test_qa_windows_overlap_by_stride_and_map_to_examples():
    ex = load_squad_examples(QA_EN)[:30]
    tokenizer = qa.train_tiny_tokenizer(qa_texts(ex))
    long_ex = dict(ex[0], id="long", context=" ".join([ex[0]["context"]] * 6))
    short_ex = dict(ex[1], context="The Broncos won.", answers=[{"text": "Broncos", "answer_start": 4}])
    feats = qa.build_features([short_ex, long_ex], tokenizer, max_length=128, stride=32)
    idx = feats["example_index"]
    assert idx[0] == 0 and (idx[1:] == 1).all() and len(idx) > 3
    for a, b in zip(np.nonzero(idx == 1)[0][:-1], np.nonzero(idx == 1)[0][1:]):
        assert len(feats["input_ids"][a]) <= 128
        ctx_a = feats["offsets"][a][feats["allowed"][a]][1:]
        ctx_b = feats["offsets"][b][feats["allowed"][b]][1:]
        assert (ctx_a[-32:] == ctx_b[:32]).all()              # overlap of `stride` context tokens


# ------------------------------------------------------------------ batching
def test_qa_length_grouped_batches_deterministic_and_complete():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 384, size=1000)
    a = qa.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    b = qa.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    c = qa.length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == len(b)
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    assert not all(len(x) == len(y) and (x == y).all() for x, y in zip(a, c))
    padded = sum(len(x) * lengths[x].max() for x in a)
    assert padded < 1.05 * lengths.sum()                       # length grouping keeps padding low
    parts = [qa.length_grouped_batches(lengths, 8, 1, 0, rank=r, world_size=3) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    flat = [np.concatenate(p) for p in parts]
    assert len(set(flat[0]) & set(flat[1])) == 0 and len(set(flat[1]) & set(flat[2])) == 0


def test_qa_loss_and_logits_independent_of_padding():
    ex = load_squad_examples(QA_EN)[:40]
    model, tokenizer = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
    model.eval()
    feats = qa.build_features(ex, tokenizer)
    lengths = np.array([len(x) for x in feats["input_ids"]])
    short, long = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[long] > 2 * lengths[short]
    with torch.no_grad():
        alone = qa.collate(feats, [short], tokenizer.pad_token_id, "cpu")
        both = qa.collate(feats, [short, long], tokenizer.pad_token_id, "cpu")
        s1, e1 = qa.qa_logits(model, alone)
        s2, e2 = qa.qa_logits(model, both)
        n = lengths[short]
        torch.testing.assert_close(s2[0, :n], s1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e2[0, :n], e1[0], atol=1e-5, rtol=1e-5)
        assert (s2[0, n:] == qa.MASK_VALUE).all() and (s1[0][~alone["allowed"][0]] == qa.MASK_VALUE).all()
        l1 = qa.ce_loss(s1, e1, alone["start_positions"], alone["end_positions"])
        l2 = qa.ce_loss(s2[:1], e2[:1], both["start_positions"][:1], both["end_positions"][:1])
        torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ answer extraction
def qa_reference_spans(start, end, allowed, n_best, max_tokens):
    """Slow and obvious: top n_best starts and ends among the context positions, every pair."""
    ctx = [i for i in range(1, len(start)) if allowed[i]]
    starts = sorted(ctx, key=lambda i: -start[i])[:n_best]
    ends = sorted(ctx, key=lambda i: -end[i])[:n_best]
    spans = [(start[s] + end[e], s, e) for s in starts for e in ends if s <= e < s + max_tokens]
    return sorted(spans, reverse=True)


def test_qa_extract_spans_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    B, L = 24, 70
    start, end = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    allowed = torch.rand(B, L, generator=g) > 0.3
    allowed[:, 0] = True
    allowed[0, 1:] = False                      # no context: no span
    allowed[1, 1:] = False
    allowed[1, 5] = True                        # one context token: the span (5, 5)
    start, end = start.masked_fill(~allowed, qa.MASK_VALUE), end.masked_fill(~allowed, qa.MASK_VALUE)
    for n_best, max_tokens, top in [(20, 30, 1), (20, 3, 5), (4, 30, 7)]:
        scores, s_idx, e_idx = qa.extract_spans(start, end, allowed, n_best, max_tokens, top=top)
        assert (s_idx[~torch.isfinite(scores)] == 0).all() and (e_idx[~torch.isfinite(scores)] == 0).all()
        for b in range(B):
            ref = qa_reference_spans(start[b].tolist(), end[b].tolist(), allowed[b].tolist(), n_best,
                                     max_tokens)[:top]
            got = [(scores[b, j].item(), s_idx[b, j].item(), e_idx[b, j].item())
                   for j in range(scores.shape[1]) if torch.isfinite(scores[b, j])]
            assert [(s, e) for _, s, e in got] == [(s, e) for _, s, e in ref]
            assert np.allclose([x for x, _, _ in got], [x for x, _, _ in ref], atol=1e-5)
    assert qa.extract_spans(start, end, allowed)[1][1].item() == 5


class QaPointerModel(torch.nn.Module):
    """Fake QA model: start logit high on token `a`, end logit high on token `b` (b scored lower
    in the windows after the first, so the best window is known)."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b, self.w = a, b, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, token_type_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1])[None].float()
        start = (input_ids == self.a).float() * 10 - pos * 1e-3
        end = (input_ids == self.b).float() * 10 - pos * 1e-3
        return types.SimpleNamespace(start_logits=start + self.w, end_logits=end + self.w)


def test_qa_predict_best_window_and_n_best_distinct():
    filler = " ".join(f"w{i}" for i in range(300))
    context = filler + " Zebra Crossing " + filler
    ex = [{"id": "x", "question": "Where?", "context": context, "answers": []},
          {"id": "y", "question": "Where?", "context": "Zebra Crossing now", "answers": []}]
    tokenizer = qa.train_tiny_tokenizer([context, "Where?"])
    a, b = tokenizer.convert_tokens_to_ids(["Zebra", "Crossing"])
    model = QaPointerModel(a, b)
    feats = qa.build_features(ex, tokenizer, max_length=128, stride=32, train=False)
    assert (feats["example_index"] == 0).sum() > 3
    pred = qa.predict(model, tokenizer, ex, batch_size=3, device="cpu", features=feats)
    assert pred == {"x": "Zebra Crossing", "y": "Zebra Crossing"}
    top = qa.predict(model, tokenizer, ex, batch_size=3, device="cpu", n_best_size=5)
    assert top["x"][0] == "Zebra Crossing" and len(top["x"]) == 5 and len(set(top["x"])) == 5
    assert all(t in context for t in top["x"])
    assert qa.predict(model, tokenizer, [], device="cpu") == {}
    assert qa.predict(model, tokenizer, [], device="cpu", n_best_size=3) == {}


# ------------------------------------------------------------------ learning
QA_CATEGORIES = ["colour", "animal", "fruit", "tool"]


def qa_synthetic(n, seed):
    """Contexts of random invented words holding one item (1-2 words) of each category; the
    question names a category; the answer is its item. Held-out sets use other contexts."""
    rng = random.Random(0)
    vocab = list(dict.fromkeys("".join(rng.choice("bdgkmnprstvz") + rng.choice("aeiou") for _ in range(2))
                               for _ in range(400)))
    filler = vocab[:200]
    items = {c: [" ".join(vocab[200 + 40 * k + 2 * i:200 + 40 * k + 2 * i + 1 + i % 2]) for i in range(20)]
             for k, c in enumerate(QA_CATEGORIES)}
    rng, out = random.Random(seed), []
    for i in range(n):
        words = rng.sample(filler, 12)
        picks = {c: rng.choice(items[c]) for c in QA_CATEGORIES}
        for c in QA_CATEGORIES:
            words.insert(rng.randrange(len(words) + 1), picks[c])
        c = rng.choice(QA_CATEGORIES)
        j = words.index(picks[c])
        start = len(" ".join(words[:j])) + (1 if j else 0)
        out.append({"id": f"syn{seed}-{i}", "title": "", "question": f"Which {c} is named here ?",
                    "context": " ".join(words), "answers": [{"text": picks[c], "answer_start": start}]})
    return out


def qa_f1(pred, gold):
    p, g = pred.split(), gold.split()
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    return 0.0 if common == 0 else 2 * common / (len(p) + len(g))


def test_qa_tiny_model_learns_synthetic_task(qa_one_thread):
    train, held_out = qa_synthetic(1500, seed=0), qa_synthetic(200, seed=1)
    model, tokenizer = qa.load_model_and_tokenizer("tiny", texts=qa_texts(train), seed=0)
    feats = qa.build_features(train, tokenizer)
    before = qa.predict(model, tokenizer, held_out, device="cpu")
    model = qa.train(model, feats, tokenizer.pad_token_id, epochs=14, lr=1e-3, batch_size=32, seed=0,
                     warmup_steps=50, progress=False)
    pred = qa.predict(model, tokenizer, held_out, device="cpu")
    f1 = np.mean([qa_f1(pred[ex["id"]], ex["answers"][0]["text"]) for ex in held_out])
    f1_before = np.mean([qa_f1(before[ex["id"]], ex["answers"][0]["text"]) for ex in held_out])
    assert f1_before < 0.5 and f1 > 0.9, (f1_before, f1)


# ------------------------------------------------------------------ command line
def qa_run_cli(args):
    with pytest.raises(SystemExit) as e:
        qa.run_main(lambda: qa.main(args))
    return e.value.code


def test_qa_cli_tiny_writes_loadable_hf_directory(tmp_path, qa_one_thread):
    out = str(tmp_path / "model")
    qa.main(["--model", "tiny", "--train-file", QA_EN, "--epochs", "1", "--max-examples", "40",
             "--batch-size", "8", "--output-dir", out])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    model = AutoModelForQuestionAnswering.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    assert tokenizer.is_fast and tokenizer.tokenize("Zürich Straße") == \
        qa.load_model_and_tokenizer(out, require_qa_head=True)[1].tokenize("Zürich Straße")
    ex = load_squad_examples(QA_EN)[:5]
    pred = qa.predict(model, tokenizer, ex, device="cpu")
    assert set(pred) == {e["id"] for e in ex} and all(pred[e["id"]] in e["context"] for e in ex)
    from transformers import pipeline          # requirements pin transformers 4.x for it
    answer = pipeline("question-answering", model=out)(question=ex[0]["question"], context=ex[0]["context"])
    assert answer["answer"] in ex[0]["context"]


def test_qa_same_seed_same_weights(tmp_path, qa_one_thread):
    from safetensors.torch import load_file
    args = ["--model", "tiny", "--train-file", QA_EN, "--epochs", "1", "--max-examples", "12",
            "--batch-size", "4", "--lr", "1e-3"]
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        qa.main(args + ["--seed", seed, "--output-dir", str(tmp_path / name)])
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_qa_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    tiny = ["--model", "tiny", "--epochs", "1", "--max-examples", "4"]
    existing = tmp_path / "exists"
    existing.mkdir()
    not_qa = tmp_path / "not_qa"
    not_qa.mkdir()
    (not_qa / "config.json").write_text(json.dumps({"model_type": "vit"}))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases = [
        (tiny + ["--train-file", str(tmp_path / "missing.json"), "--output-dir", str(tmp_path / "o0")],
         "missing.json"),
        (tiny + ["--train-file", QA_EN, "--output-dir", str(existing)], "--overwrite"),
        (["--model", str(not_qa), "--train-file", QA_EN, "--output-dir", str(tmp_path / "o1")], "not_qa"),
        (["--model", str(no_config), "--train-file", QA_EN, "--output-dir", str(tmp_path / "o2")], "no_config"),
        (["--model", str(tmp_path / "nowhere" / "m"), "--train-file", QA_EN,
          "--output-dir", str(tmp_path / "o3")], "nowhere"),
        (tiny + ["--train-file", QA_EN, "--batch-size", "6", "--grad-accum", "4",
                 "--output-dir", str(tmp_path / "o4")], "--grad-accum"),
        (tiny + ["--train-file", QA_EN, "--epochs", "0", "--output-dir", str(tmp_path / "o6")],
         "--epochs"),
    ]
    for args, needle in cases:
        assert qa_run_cli(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()
    assert not (tmp_path / "o6").exists()
    monkeypatch.chdir(tmp_path)                      # the default SQuAD file is absent here
    assert qa_run_cli(["--output-dir", str(tmp_path / "o5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python data/download.py squad" in err[0]


def test_qa_model_dirs_that_do_not_load_are_one_quiet_error(tmp_path, capfd):
    """Corrupt or non-QA model directories: one InputError naming the directory, and nothing
    from transformers on stderr (no load report, no progress bar, no traceback)."""
    from transformers import BertConfig, BertModel
    texts = ["a small text for a vocabulary", "another small text"]
    good = str(tmp_path / "good")
    qa.save_model(*qa.load_model_and_tokenizer("tiny", texts), good)

    def variant(name, edit):
        path = tmp_path / name
        shutil.copytree(good, path)
        edit(path)
        return str(path)

    def resize(path):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(dict(config, hidden_size=64)))

    not_qa = str(tmp_path / "not_qa")
    tok = qa.load_model_and_tokenizer(good)[1]
    BertModel(BertConfig(vocab_size=len(tok), **qa.TINY_CONFIG)).save_pretrained(not_qa)
    tok.save_pretrained(not_qa)
    cases = {
        variant("shapes", resize): "cannot load",
        variant("truncated", lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:5000])): "cannot load",
        variant("bad_tokenizer", lambda p: (p / "tokenizer.json").write_text('{"model": 3}')):
            "tokenizer",
        not_qa: "QA head",
    }
    capfd.readouterr()
    for path, needle in cases.items():
        with pytest.raises(qa.InputError) as e:
            qa.load_model_and_tokenizer(path, require_qa_head=True)
        assert path in str(e.value) and needle in str(e.value), e.value
    model, _ = qa.load_model_and_tokenizer(not_qa)         # phase 1: a new head is expected
    assert model.qa_outputs.weight.shape[0] == 2
    out, err = capfd.readouterr()
    assert err == "" and out.strip() == f"note: {not_qa} has no QA head; it starts newly " \
        "initialised (Sec. 4.1)"


def test_qa_two_process_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(QA_ROOT, "train_qa.py"), "--model", "tiny", "--train-file", QA_EN,
           "--epochs", "1", "--max-examples", "16", "--batch-size", "8", "--output-dir", out]
    r = subprocess.run(cmd, cwd=QA_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device cpu x 2" in r.stdout and r.stdout.count("saved ") == 1   # one process saves
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))


def test_qa_check_offsets_command(tmp_path):
    for lang in ("zh", "ar"):
        shutil.copy(os.path.join(QA_XQUAD, f"xquad.{lang}.json"), tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(QA_ROOT, "train_qa.py"), "--check-offsets",
                           "--xquad-dir", str(tmp_path)], capture_output=True, text=True, cwd=QA_ROOT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.strip().splitlines()[1:]}
    assert set(rows) == {"ar", "zh"}
    assert all(r[1] == "1190" and r[4] == "100.00%" for r in rows.values())
    assert all(float(r[5].rstrip("%")) > 95 for r in rows.values())
    empty = subprocess.run([sys.executable, os.path.join(QA_ROOT, "train_qa.py"), "--check-offsets",
                            "--xquad-dir", str(tmp_path / "none")], capture_output=True, text=True,
                           cwd=QA_ROOT)
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ optimisation
def test_qa_optimizer_groups_and_linear_schedule():
    ex = load_squad_examples(QA_EN)[:4]
    model, _ = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
    opt = qa.make_optimizer(model, 1e-3, weight_decay=0.01)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert not any("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    sched = qa.make_scheduler(opt, total_steps=10, warmup_steps=0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.allclose(lrs, [1e-3 * (10 - i) / 10 for i in range(10)])
    assert opt.param_groups[0]["lr"] == 0.0


def test_qa_grad_accumulation_matches_full_batch(qa_one_thread, monkeypatch):
    # plain SGD, no clipping: the update is the gradient itself, so its scale is checked too
    monkeypatch.setattr(qa, "make_optimizer", lambda model, lr, wd: torch.optim.SGD(model.parameters(), lr))
    monkeypatch.setattr(qa, "MAX_GRAD_NORM", 1e9)
    ex = load_squad_examples(QA_EN)[:8]
    weights = []
    for accum in (1, 2, 4):
        model, tokenizer = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if hasattr(m, "dropout_prob"):     # transformers 4.x SDPA attention's own dropout
                m.dropout_prob = 0.0
        feats = qa.build_features(ex, tokenizer)
        assert len(feats["input_ids"]) == 8
        model = qa.train(model, feats, tokenizer.pad_token_id, epochs=1, lr=0.1, batch_size=8,
                         grad_accum=accum, seed=0, progress=False)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    init, _ = qa.load_model_and_tokenizer("tiny", texts=qa_texts(ex), seed=0)
    k = "qa_outputs.weight"
    assert not torch.allclose(weights[0][k], init.state_dict()[k])      # one step was taken
    start = init.state_dict()
    for w in weights[1:]:          # the update of each tensor equals the full batch's (to rounding)
        for name in w:
            full, part = weights[0][name] - start[name], w[name] - start[name]
            assert (part - full).norm() <= 1e-4 * full.norm() + 1e-7, name
