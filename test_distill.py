"""Tests of phase 2: map_at_k.py (Eq. 5) and distill.py (Eq. 4/6, generations, checkpoints, DDP)."""
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import common
import distill
import map_at_k as mapk

HERE = os.path.dirname(os.path.abspath(__file__))
DISTILL_XQUAD_DIR = os.path.join(HERE, "data", "xquad")


# ---------------------------------------------------------------- map_at_k.py: Eq. 5

def _map_brute_ap(row, gold, k, delta, variant, allowed):
    """Eq. 5 for one row, written as the plain loops of its definition."""
    positions = [j for j in range(len(row)) if allowed[j]]
    ranked = sorted(positions, key=lambda j: -row[j])[:k]
    hits, total, first = 0, 0.0, None
    for r, j in enumerate(ranked, start=1):
        if gold - delta <= j < gold + delta:
            hits += 1
            total += hits / r
            if first is None:
                first = r
    if variant == "paper":
        return total / min(k, 2 * delta)
    return 0.0 if first is None else 1.0 / first


def test_map_hand_example():
    # positions ranked 3, 0, 7, 4 (logits descending); gold 4, delta 2 -> window [2, 6)
    logits = torch.tensor([[5.0, 0.0, 0.0, 9.0, 1.0, 0.0, 0.0, 3.0]])
    gold = torch.tensor([4])
    # top-4: 3 (rel), 0 (no), 7 (no), 4 (rel): AP = (1/1 + 2/4) / min(4, 4) = 0.375
    ap = mapk.average_precision_at_k(logits, gold, k=4, delta=2)
    assert ap.tolist() == pytest.approx([0.375])
    rr = mapk.average_precision_at_k(logits, gold, k=4, delta=2, variant="first-hit")
    assert rr.tolist() == pytest.approx([1.0])
    # masking position 3 removes the first hit: ranking 0, 7, 4, then nothing else above 0
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[0, 3] = False
    rr = mapk.average_precision_at_k(logits, gold, k=4, delta=2, variant="first-hit", mask=mask)
    assert rr.tolist() == pytest.approx([1 / 3])


@pytest.mark.parametrize("variant", ["paper", "first-hit"])
def test_map_matches_brute_force(variant):
    gen = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    for trial in range(60):
        B, L = rnd.randint(1, 6), rnd.randint(1, 40)
        k, delta = rnd.choice([1, 2, 3, 10, 50]), rnd.choice([1, 2, 5, 8])
        logits = torch.randn(B, L, generator=gen)
        # masks from "everything allowed" to "a single allowed position" (fewer than k)
        p_allowed = rnd.choice([1.0, 0.6, 0.2])
        mask = torch.rand(B, L, generator=gen) < p_allowed
        mask[:, rnd.randrange(L)] = True  # at least one allowed, as [CLS] always is
        # gold at the edges (0, L-1) as well as inside
        gold = torch.tensor([rnd.choice([0, L - 1, rnd.randrange(L)]) for _ in range(B)])
        use_mask = trial % 4 != 0
        ap = mapk.average_precision_at_k(logits, gold, k=k, delta=delta, variant=variant,
                                         mask=mask if use_mask else None)
        allowed = mask if use_mask else torch.ones_like(mask)
        expected = [_map_brute_ap(logits[b].tolist(), int(gold[b]), k, delta, variant,
                                  allowed[b].tolist()) for b in range(B)]
        assert ap.shape == (B,)
        assert ap.tolist() == pytest.approx(expected, abs=1e-6), (trial, k, delta)


def test_map_never_picks_masked_position_even_with_fewer_than_k_allowed():
    # the masked positions have the highest logits and sit on the gold: still never relevant
    logits = torch.tensor([[0.0, 10.0, 11.0, 12.0, -1.0]])
    mask = torch.tensor([[True, False, False, False, True]])
    gold = torch.tensor([2])
    ap = mapk.average_precision_at_k(logits, gold, k=10, delta=2, mask=mask)
    # ranked: 0 (in [0, 4): rel), 4 (not rel); AP = 1 / min(10, 4)
    assert ap.tolist() == pytest.approx([0.25])
    rr = mapk.average_precision_at_k(logits, gold, k=10, delta=2, mask=mask, variant="first-hit")
    assert rr.tolist() == pytest.approx([1.0])
    none_rel = mapk.average_precision_at_k(logits, torch.tensor([3]), k=10, delta=1, mask=mask)
    assert none_rel.tolist() == [0.0]


def test_map_alpha_is_mean_of_start_and_end_and_has_no_grad():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(5, 30, generator=gen, requires_grad=True)
    e = torch.randn(5, 30, generator=gen, requires_grad=True)
    sp, ep = torch.tensor([0, 3, 10, 29, 15]), torch.tensor([2, 5, 12, 29, 0])
    mask = torch.rand(5, 30, generator=gen) < 0.7
    mask[:, 0] = True
    alpha = mapk.map_at_k(s, e, sp, ep, k=10, delta=5, mask=mask)
    assert not alpha.requires_grad and alpha.dim() == 0
    expected_s = sum(_map_brute_ap(s[b].tolist(), int(sp[b]), 10, 5, "paper", mask[b].tolist())
                     for b in range(5)) / 5
    expected_e = sum(_map_brute_ap(e[b].tolist(), int(ep[b]), 10, 5, "paper", mask[b].tolist())
                     for b in range(5)) / 5
    assert float(alpha) == pytest.approx((expected_s + expected_e) / 2, abs=1e-6)
    # a perfect teacher (gold first, its window next) reaches alpha = 1
    perfect = torch.full((1, 40), -5.0)
    perfect[0, 20] = 10.0
    perfect[0, 15:25] += torch.linspace(1, 2, 10)
    one = mapk.map_at_k(perfect, perfect, torch.tensor([20]), torch.tensor([20]))
    assert float(one) == pytest.approx(1.0)


def test_map_rejects_bad_arguments():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError):
        mapk.average_precision_at_k(x, torch.tensor([0]), variant="nope")
    with pytest.raises(ValueError):
        mapk.average_precision_at_k(x, torch.tensor([0]), k=0)


# ---------------------------------------------------------------- distill.py: the loss (Eq. 4, 6)

def _distill_hand_softmax(row, allowed, t=1.0):
    z = sum(math.exp(x / t) for x, a in zip(row, allowed) if a)
    return [math.exp(x / t) / z if a else 0.0 for x, a in zip(row, allowed)]


def _distill_hand_terms(s, e, ts, te, sp, ep, allowed, t):
    """CE (Eq. 2) and t^2 KL(teacher || student) (Eq. 4), written out with math.exp/log."""
    ce = kl = 0.0
    B = len(s)
    for b in range(B):
        for stu, tea, gold in ((s[b], ts[b], sp[b]), (e[b], te[b], ep[b])):
            p = _distill_hand_softmax(stu, allowed[b])
            ce += -math.log(p[gold]) / 2
            ps, pt = _distill_hand_softmax(stu, allowed[b], t), _distill_hand_softmax(tea, allowed[b], t)
            kl += t * t * sum(q * (math.log(q) - math.log(r))
                              for q, r, a in zip(pt, ps, allowed[b]) if a) / 2
    return ce / B, kl / B


def _distill_small_batch(seed=0, B=3, L=7):
    gen = torch.Generator().manual_seed(seed)
    s, e, ts, te = (torch.randn(B, L, generator=gen) * 2 for _ in range(4))
    allowed = torch.zeros(B, L, dtype=torch.bool)
    allowed[:, 0] = True                       # [CLS]
    allowed[0, 3:] = True                      # context tokens after a short question
    allowed[1, 2:6] = True
    allowed[2, 5:7] = True                     # fewer allowed positions than k
    sp, ep = torch.tensor([4, 0, 5]), torch.tensor([6, 5, 6])
    return s, e, ts, te, sp, ep, allowed


@pytest.mark.parametrize("mode", ["skd-map", "skd", "ce", "skd-noce", "skd-map-noce"])
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_distill_loss_equals_eq4_eq6_by_hand(mode, t):
    s, e, ts, te, sp, ep, allowed = _distill_small_batch()
    k, delta = 10, 2
    alpha = mapk.map_at_k(ts, te, sp, ep, k=k, delta=delta, mask=allowed)
    a_ce, a_kl = distill.coefficients(mode, alpha if "map" in mode else None)
    teacher = (None, None) if mode == "ce" else (ts, te)
    loss, ce, kl = distill.distill_loss(s, e, sp, ep, allowed, *teacher, t=t, a_ce=a_ce, a_kl=a_kl)

    tolist = lambda x: x.tolist()  # noqa: E731
    ce_h, kl_h = _distill_hand_terms(*map(tolist, (s, e, ts, te, sp, ep, allowed)), t)
    alpha_h = sum(_map_brute_ap(row.tolist(), int(g), k, delta, "paper", m.tolist())
                  for x, gold in ((ts, sp), (te, ep)) for row, g, m in zip(x, gold, allowed)) / (2 * 3)
    expected_coef = {"skd-map": (1, alpha_h), "skd": (1, 1), "ce": (1, 0), "skd-noce": (0, 1),
                     "skd-map-noce": (0, alpha_h)}[mode]
    assert (float(a_ce), float(a_kl)) == pytest.approx(expected_coef, abs=1e-6)
    assert float(ce) == pytest.approx(ce_h, rel=1e-5)
    if mode == "ce":
        assert kl is None
        assert float(loss) == pytest.approx(ce_h, rel=1e-5)
    else:
        assert float(kl) == pytest.approx(kl_h, rel=1e-5)
        a, b = expected_coef
        assert float(loss) == pytest.approx(a * ce_h + b * kl_h, rel=1e-5)


def test_distill_loss_ignores_masked_positions_and_padding():
    s, e, ts, te, sp, ep, allowed = _distill_small_batch(seed=1)
    s.requires_grad_(True)
    loss, _, kl = distill.distill_loss(s, e, sp, ep, allowed, ts, te, t=2.0)
    loss.backward()
    assert float(kl.detach()) > 0
    assert torch.all(s.grad[~allowed] == 0) and torch.any(s.grad[allowed] != 0)
    # garbage at masked positions and extra padding columns change nothing
    junk = lambda x: torch.where(allowed, x, torch.full_like(x, 50.0))  # noqa: E731
    pad = lambda x, v: torch.cat([x, torch.full((x.shape[0], 4), v, dtype=x.dtype)], 1)  # noqa: E731
    loss2, _, _ = distill.distill_loss(pad(junk(s.detach()), 9.0), pad(junk(e), -3.0), sp, ep,
                                       pad(allowed, False), pad(junk(ts), 7.0), pad(junk(te), 1.0), t=2.0)
    assert float(loss2) == pytest.approx(float(loss.detach()), rel=1e-6)
    # identical teacher and student: KL = 0; KL scales as t^2 x KL at temperature t
    _, _, zero = distill.distill_loss(s.detach(), e, sp, ep, allowed, s.detach(), e, t=3.0)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["skd-map", "skd", "ce", "skd-map-noce"])
def test_distill_row_slices_give_the_same_loss_and_gradient(mode):
    """forward_backward(rows=3) (the CPU path) equals one pass over the whole batch: CE and KL
    are row means and alpha is computed once per batch (Eq. 6)."""
    import train_qa
    from common import load_squad_examples
    ex = load_squad_examples(os.path.join(os.path.dirname(__file__), "data", "xquad",
                                          "xquad.en.json"))[:7]
    model, tok = train_qa.load_model_and_tokenizer(
        "tiny", texts=[x for e in ex for x in (e["question"], e["context"])], seed=1)
    model.eval()                                   # no dropout: both passes see the same function
    teacher, _ = train_qa.load_model_and_tokenizer(
        "tiny", texts=[x for e in ex for x in (e["question"], e["context"])], seed=2)
    teacher = None if mode == "ce" else teacher.eval()
    feats = train_qa.build_features(ex, tok)
    batch = train_qa.collate(feats, list(range(len(feats["input_ids"]))), tok.pad_token_id, "cpu")
    opts = distill.StepOptions(mode=mode, t=2.0)
    results = []
    for rows in (None, 3):
        model.zero_grad()
        stats = distill.forward_backward(model, teacher, batch, opts, rows=rows)
        results.append((stats, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (s1, g1), (s2, g2) = results
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_distill_coefficients_need_alpha_for_map_modes():
    with pytest.raises(ValueError):
        distill.coefficients("skd-map", None)
    assert distill.mode_name(ce_only=True) == "ce"
    assert distill.mode_name(map_k=True, no_ce=True) == "skd-map-noce"


# ---------------------------------------------------------------- distill.py: runs (tiny model, CPU)

DISTILL_TINY = ["--model", "tiny", "--ntl", "1", "--max-examples", "8", "--batch-size", "4",
                "--epochs", "3", "--max-length", "128", "--stride", "64", "--t", "2", "--map-k"]


def _distill_main(argv, capsys=None):
    """distill.py's command line in this process -> (exit status, stderr)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["distill.py"] + [str(a) for a in argv])
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            distill.cli()
            code = 0
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def _distill_state(out):
    return torch.load(os.path.join(out, "checkpoint", "state.pt"), map_location="cpu",
                      weights_only=False)


def _distill_same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _distill_weights(model_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _distill_mlqa_dir(root):
    """A two-pair MLQA-dev lookalike (en-en, en-de) cut from XQuAD."""
    en = common.load_squad_examples(os.path.join(DISTILL_XQUAD_DIR, "xquad.en.json"))[:4]
    de = common.load_squad_examples(os.path.join(DISTILL_XQUAD_DIR, "xquad.de.json"))[:4]
    dev = os.path.join(root, "dev")
    os.makedirs(dev)
    common.atomic_write_json(os.path.join(dev, "dev-context-en-question-en.json"),
                             common.examples_to_squad(en))
    cross = [dict(d, question=x["question"]) for x, d in zip(en, de)]
    common.atomic_write_json(os.path.join(dev, "dev-context-de-question-en.json"),
                             common.examples_to_squad(cross))
    return root


class _DistillFakeDev:
    """evaluate_dev stand-in: G-XLT F1 by epoch, so that epoch 2 is the best on dev."""
    scores = [10.0, 30.0, 20.0]

    def __init__(self):
        self.epoch = 0

    def __call__(self, model, tokenizer, dev_sets, device, features=None):
        f1 = self.scores[self.epoch]
        self.epoch += 1
        return {"pairs": {k: {"f1": f1, "exact_match": 0.0, "n": 1} for k in dev_sets},
                "xlt": {"f1": f1, "exact_match": 0.0}, "gxlt": {"f1": f1, "exact_match": 0.0}}


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory):
    """An uninterrupted 3-epoch run, and the same run stopped after epochs 1 and 2 and resumed."""
    import train_qa
    root = tmp_path_factory.mktemp("distill")
    mlqa = _distill_mlqa_dir(str(root / "mlqa"))
    # a saved tiny QA model: the runs start from it, and it is generation 0's teacher
    init = str(root / "init")
    texts = [x for ex in common.load_squad_examples(os.path.join(DISTILL_XQUAD_DIR, "xquad.en.json"))[:20]
             for x in (ex["question"], ex["context"])]
    train_qa.save_model(*train_qa.load_model_and_tokenizer("tiny", texts, seed=3), init)
    argv = [a if a != "tiny" else init for a in DISTILL_TINY] + ["--mlqa-dir", mlqa]
    fake = _DistillFakeDev()
    runs = {"root": root, "mlqa": mlqa, "init": init, "argv": argv, "states": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "evaluate_dev", fake)
        full = str(root / "full")
        assert _distill_main(argv + ["--output-dir", full])[0] == 0
        fake.epoch = 0
        part = str(root / "part")
        base = argv + ["--output-dir", part]
        assert _distill_main(base + ["--stop-after-epoch", "1"])[0] == 0
        runs["states"].append(_distill_state(part))
        assert not os.path.exists(os.path.join(part, "config.json"))
        assert _distill_main(base + ["--resume", "--stop-after-epoch", "2"])[0] == 0
        runs["states"].append(_distill_state(part))
        assert _distill_main(base + ["--resume"])[0] == 0
    runs["full"], runs["part"] = full, part
    return runs


def test_distill_resumed_run_equals_uninterrupted_run(distill_runs):
    full, part = distill_runs["full"], distill_runs["part"]
    a, b = _distill_state(full), _distill_state(part)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    assert _distill_same(a["student"], b["student"])          # bitwise on CPU
    assert _distill_same(a["teacher"], b["teacher"])
    assert _distill_same(_distill_weights(full), _distill_weights(part))
    log_a = distill.read_log(os.path.join(full, "train_log.jsonl"))
    log_b = distill.read_log(os.path.join(part, "train_log.jsonl"))
    assert log_a == log_b and [r["step"] for r in log_a] == list(range(1, len(log_a) + 1))
    assert sorted({r["epoch"] for r in log_a}) == [1, 2, 3]
    for row in log_a:
        assert set(row) == {"step", "epoch", "lr", "loss", "ce", "kl", "alpha"}
        assert 0.0 <= row["alpha"] <= 1.0 and row["kl"] >= 0.0
        assert row["loss"] == pytest.approx(row["ce"] + row["alpha"] * row["kl"], rel=1e-4, abs=1e-6)
    assert os.path.getsize(os.path.join(full, "alpha.png")) > 1000


def test_distill_teacher_is_previous_epochs_student(distill_runs):
    s1, s2 = distill_runs["states"]
    s3 = _distill_state(distill_runs["full"])
    assert _distill_same(s2["teacher"], s1["student"])        # generation of epoch 2
    assert _distill_same(s3["teacher"], s2["student"])        # generation of epoch 3
    assert _distill_same(s1["teacher"], _distill_weights(distill_runs["init"]))  # generation 0
    for s in (s1, s2, s3):                                    # never the live student
        assert not _distill_same(s["teacher"], s["student"])
    assert not _distill_same(s1["teacher"], s2["teacher"])


def test_distill_keeps_best_on_dev_model(distill_runs):
    full = distill_runs["full"]
    final = _distill_weights(full)
    s3 = _distill_state(full)
    assert s3["best"] == {"score": 30.0, "epoch": 2}
    # the best epoch is 2: the final model is the student after epoch 2 (= epoch 3's teacher)
    assert all(torch.equal(final[k], s3["teacher"][k]) for k in final)
    assert not all(torch.equal(final[k], s3["student"][k]) for k in final)
    rows = distill.read_log(os.path.join(full, "dev_metrics.jsonl"))
    assert [r["best"] for r in rows] == [True, True, False]
    assert not [p for p in os.listdir(full) if p.startswith("best-epoch")]


def test_distill_model_dir_loads_and_dev_evaluation_scores_it(distill_runs):
    import train_qa
    from evaluate_mlqa import evaluate_predictions
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    full = distill_runs["full"]
    from transformers import pipeline          # requirements pin transformers 4.x for it
    qa = pipeline("question-answering", model=full)
    assert qa(question="Who?", context="Bob went to Paris.")["answer"] in "Bob went to Paris."
    model = AutoModelForQuestionAnswering.from_pretrained(full)
    tokenizer = AutoTokenizer.from_pretrained(full)
    dev = distill.load_mlqa_dev(distill_runs["mlqa"])
    assert sorted(dev) == ["en-de", "en-en"]
    metrics = distill.evaluate_dev(model, tokenizer, dev, "cpu")
    for key, examples in dev.items():
        preds = train_qa.predict(model, tokenizer, examples, device="cpu")
        direct = evaluate_predictions(examples, preds, key.split("-")[1], report_unanswered=False)
        assert metrics["pairs"][key] == direct
    assert metrics["xlt"]["f1"] == metrics["pairs"]["en-en"]["f1"]
    assert metrics["gxlt"]["f1"] == metrics["pairs"]["en-de"]["f1"]


def test_distill_nonfinite_loss_stops_with_checkpoint_intact(tmp_path, capsys):
    out = str(tmp_path / "nan")
    saved = {}
    real_save, real_loss = distill.save_state, distill.distill_loss

    def save(path, state):
        real_save(path, state)
        saved["bytes"] = open(path, "rb").read()

    def loss(*args, **kw):
        total, ce, kl = real_loss(*args, **kw)
        return (total * float("nan"), ce, kl) if saved else (total, ce, kl)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "save_state", save)
        mp.setattr(distill, "distill_loss", loss)
        code, err = _distill_main(DISTILL_TINY + ["--output-dir", out, "--epochs", "2"], capsys)
    assert code not in (0, None)
    assert "non-finite loss" in err and "Traceback" not in err
    assert open(os.path.join(out, "checkpoint", "state.pt"), "rb").read() == saved["bytes"]
    assert _distill_state(out)["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "config.json"))


def test_distill_ce_only_runs_no_teacher(tmp_path):
    out = str(tmp_path / "ce")
    calls = []
    real = distill.qa_logits

    def counting(model, batch):
        calls.append(model.training)
        return real(model, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "qa_logits", counting)
        argv = [a for a in DISTILL_TINY if a != "--map-k"]
        assert _distill_main(argv + ["--ce-only", "--epochs", "1", "--output-dir", out])[0] == 0
    rows = distill.read_log(os.path.join(out, "train_log.jsonl"))
    assert rows and all(r["kl"] is None and r["alpha"] is None for r in rows)
    assert all(r["loss"] == pytest.approx(r["ce"]) for r in rows)
    assert len(calls) == len(rows) and all(calls)             # student passes only
    assert _distill_state(out)["teacher"] is None


def test_distill_two_process_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "distill.py")] + DISTILL_TINY + ["--epochs", "2", "--output-dir", out]
    r = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2" in r.stdout                                  # "device cpu x 2"
    state = _distill_state(out)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    rows = distill.read_log(os.path.join(out, "train_log.jsonl"))
    assert len(rows) == state["step"] > 0
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert not _distill_same(state["teacher"], state["student"])


# ---------------------------------------------------------------- distill.py: bad input

@pytest.mark.parametrize("extra", [["--ntl", "9"], ["--t", "0"], ["--k", "0"], ["--t", "nan"],
                                   ["--ce-only", "--map-k"]])
def test_distill_bad_option_exit_2(tmp_path, capsys, extra):
    code, err = _distill_main(DISTILL_TINY + ["--output-dir", str(tmp_path / "o")] + extra, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
    assert ("--" + extra[0].lstrip("-")) in lines[0]
    assert not os.path.exists(tmp_path / "o")


def test_distill_model_dir_that_is_not_qa_exit_2(tmp_path, capsys):
    import train_qa
    from transformers import BertConfig, BertModel
    model_dir = str(tmp_path / "bert-base-no-qa")
    tok = train_qa.train_tiny_tokenizer(["a small text for a vocabulary", "another one"], 200)
    BertModel(BertConfig(vocab_size=len(tok), **train_qa.TINY_CONFIG)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    argv = [a if a != "tiny" else model_dir for a in DISTILL_TINY]
    capsys.readouterr()
    code, err = _distill_main(argv + ["--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert model_dir in err and "QA" in err
    assert not os.path.exists(tmp_path / "o")


def test_distill_existing_output_dir_exit_2_without_traceback(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cmd = [sys.executable, os.path.join(HERE, "distill.py")] + DISTILL_TINY + ["--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "--overwrite" in r.stderr and "--resume" in r.stderr
    assert (out / "keep.txt").read_text() == "x"


def test_distill_resume_refuses_other_options(distill_runs, capsys):
    part = distill_runs["part"]
    argv = [a if a != "2" else "3" for a in distill_runs["argv"]]     # --t 3 instead of 2
    code, err = _distill_main(argv + ["--output-dir", part, "--resume"], capsys)
    assert code == 2 and "--t" in err and len(err.strip().splitlines()) == 1
    code, err = _distill_main(distill_runs["argv"] + ["--output-dir", str(distill_runs["root"] / "none"),
                                              "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err
