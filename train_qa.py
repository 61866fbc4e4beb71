"""Phase 1 (paper Sec. 3, 4.1, 5.2): fine-tune mBERT for extractive QA on SQuAD v1.1 -> mBERT-qa-en.

A flat, hand-written training loop (nanoGPT style). distill.py and evaluate_mlqa.py import its pieces:
build_features, length_grouped_batches, collate, qa_logits, ce_loss, make_optimizer, make_scheduler,
optimizer_step, setup_distributed, autocast, save_model, load_model_and_tokenizer, extract_spans, predict.

    python data/download.py squad                        # once: data/squad/train-v1.1.json, dev-v1.1.json
    python train_qa.py                                   # mBERT, 3 epochs, lr 3e-5, batch 24 (Sec. 4.1)
    torchrun --nproc_per_node 4 train_qa.py              # same, 4 GPUs (batch 24 = 4 x 6)
    python train_qa.py --resume                          # continue after Ctrl-C, SIGTERM, a crash
    python train_qa.py --model tiny --train-file data/xquad/xquad.en.json --epochs 1 --output-dir runs/tiny
    python train_qa.py --model tiny-xlmr --train-file data/xquad/xquad.en.json --epochs 1 --output-dir runs/tiny-xlmr
    python train_qa.py --model xlm-roberta-base --output-dir runs/xlmr-qa-en   # any encoder, fast tokenizer
    python train_qa.py --check-offsets [--xquad-dir data/xquad] [--model tiny|tiny-xlmr|DIR]   # offset report
    python train_qa.py --as-authors --output-dir runs/mbert-qa-en-authors   # the authors' phase 1 (README)
    python evaluate_mlqa.py --model runs/mbert-qa-en --output-dir runs/mbert-qa-en/squad-dev \
        --skip mlqa xquad tydiqa --dataset data/squad/dev-v1.1.json --squad   # SQuAD dev EM/F1

--batch-size is the effective batch of one optimiser step: world_size x micro-batch x --grad-accum.
OUTPUT_DIR holds the run while it trains (rundir.py): checkpoint/ (every epoch's end and
mid-epoch: --save-steps, a stop signal), train_log.jsonl (step, epoch, lr, loss), and at the end
the model (config.json last) and train_args.json.
--precision auto (default) is bf16 autocast on CUDA and fp32 on a CPU; bf16 opts a CPU into autocast.
Questions are cut to their first --max-query-length tokens (64, the authors' value).
Any encoder with a fast tokenizer works: windows follow the tokenizer's own pair template.
On a small CPU shared with other jobs, OMP_NUM_THREADS=1 is often several times faster.
Hyper-parameters the paper leaves at the Hugging Face defaults keep them: no warm-up, linear decay,
weight decay 0, Adam betas (0.9, 0.999), eps 1e-8, gradient clipping at norm 1.0.
"""
import contextlib
import datetime
import functools
import glob
import json
import math
import os
import re
import shutil
import sys
import time
import unicodedata

import common  # noqa: F401 (first: OpenMP's wait policy before torch loads it)
import numpy as np
import torch
import torch.nn.functional as F

from tqdm import tqdm

import cpu_dropout
from common import (SQUAD_TRAIN_FILE, XQUAD_DIR, ArgumentParser, InputError, NonFiniteLoss,
                    atomic_output_dir, atomic_write_json, check_seed, load_squad_examples,
                    parse_with_preset, run_main, save_tokenizer)
from rundir import (Checkpoint, ProgressLines, SaveClock, StopSignals, add_output_options,
                    append_row, aside_path, check_same_options, check_space, claim_output_dir,
                    finish_replacing, install_model_files, make_checkpoint_dir, parse_save_steps,
                    read_run_options, remove_checkpoint, resume_hint, start_fresh, stop_after_save,
                    truncate_log)

# -------------------------------------------------------------------- defaults (Sec. 4.1, 5.2)
MODEL = "bert-base-multilingual-cased"
OUTPUT_DIR = "runs/mbert-qa-en"
EPOCHS, LR, BATCH_SIZE, WEIGHT_DECAY, MAX_GRAD_NORM = 3, 3e-5, 24, 0.0, 1.0
MAX_LENGTH, STRIDE = 384, 128                 # window length and overlap of the sliding window
N_BEST, MAX_ANSWER_TOKENS = 20, 30            # answer extraction: top start/end candidates, span cap
MASK_VALUE = -1e9                             # logit of a position outside Eq. 1's softmax
MAX_QUERY_LENGTH = 64                         # question tokens kept (the authors' max_query_length)
PRECISIONS = ("auto", "fp32", "tf32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on a CPU
CPU_BF16_PAD_MULTIPLE = 16                    # bf16 on a CPU: batches padded to a multiple of 16 tokens
# Switches between this project's computation (first value, the default) and the authors' code
# (second value; README "Fidelity"): each is a CLI option and a keyword of the function it changes.
WINDOWS = ("fast", "legacy")                  # build_features: window starts (legacy: every --stride)
SOFTMAX_SUPPORTS = ("context", "all")         # qa_logits: Eq. 1's support, or all padded positions
BATCHES = ("grouped", "random")               # batch_order: length-grouped, or random + fixed length
ANSWERS = ("offsets", "legacy")               # predict: character offsets, or their post-processing
# --as-authors (train_qa.py): the authors' phase-1 script (train_qa_mbert.sh -> run_qa.py, the
# Trainer): 2 epochs, batch 6, lr 3e-5, questions not cut, random fixed-length batches, the loss
# over all 384 positions, true fp32
AS_AUTHORS = dict(epochs=2, batch_size=6, lr=3e-5, max_query_length=None, windows="fast",
                  softmax_support="all", batches="random", precision="fp32")
TINY_MODELS = ("tiny", "tiny-xlmr")           # random small models with a tokenizer trained on the run's text
TINY_CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256, max_position_embeddings=512)
TINY_VOCAB_SIZE = 8000
LOG_EVERY = 10                                # steps between progress-bar loss updates
MEMORY_HINT = ("smaller passes may fit: --grad-accum 2 or more (the same optimiser steps; a run "
               "with another --grad-accum starts again: --overwrite)")    # out of GPU memory
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # XLM-R's order: <pad> = 1


# -------------------------------------------------------------------- model and tokenizer
def train_tiny_tokenizer(texts, vocab_size=TINY_VOCAB_SIZE):
    """Cased WordPiece fast tokenizer trained on `texts` (BERT normaliser and pre-tokeniser: CJK
    characters split, no lower-casing or accent stripping), so offsets work for every script.

    The `tokenizers` trainer numbers its "##x" pieces in hash-map order, which breaks merge ties
    differently from run to run (huggingface/tokenizers#1794); declaring every "##x" up front, in
    sorted order, makes the vocabulary a function of the text alone."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = list(dict.fromkeys(texts))
    inner = set()
    for text in texts:
        words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
        inner.update("".join(w[1:] for w, _ in words))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=SPECIAL_TOKENS + [f"##{c}" for c in sorted(inner)])
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(          # BERT's [CLS] q [SEP] c [SEP]
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    # the generic fast class: the same code on transformers 4.x and 5.x
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=TINY_CONFIG["max_position_embeddings"])


def train_tiny_xlmr_tokenizer(texts, vocab_size=TINY_VOCAB_SIZE):
    """XLM-R-style fast tokenizer trained on `texts`: whitespace split, then SentencePiece's "▁"
    word marker (Metaspace), as xlm-roberta-base's tokenizer.json does, so offsets exclude the
    spaces; the RoBERTa pair template <s> q </s></s> c </s>, one token type. Punctuation is split
    off words (8000 pieces learnt on little text would merge "Broncos," and cut answers inexactly).

    BPE rather than XLM-R's Unigram: the `tokenizers` Unigram trainer gave a different vocabulary
    from run to run on the same text, and ran ~15x slower; BPE over the words' characters (no
    continuing-subword prefix, the alphabet numbered in sorted order) is a function of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁"),
                                                 pre_tokenizers.Punctuation()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=XLMR_SPECIAL_TOKENS)
    tok.train_from_iterator(list(dict.fromkeys(texts)), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(          # RoBERTa's, all token type 0
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    tok.decoder = decoders.Metaspace(replacement="▁")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                                   sep_token="</s>", mask_token="<mask>",
                                   model_input_names=["input_ids", "attention_mask"],  # one token type
                                   model_max_length=TINY_CONFIG["max_position_embeddings"])


def tiny_tokenizer(name, texts):
    """The tokenizer of a tiny model (`tiny`: WordPiece, `tiny-xlmr`: BPE) trained on `texts`."""
    return train_tiny_tokenizer(texts) if name == "tiny" else train_tiny_xlmr_tokenizer(texts)


def build_tiny_model(name, tokenizer):
    """A randomly initialised QA model of TINY_CONFIG's size (draws from torch's global RNG):
    `tiny` a BERT with two token types, `tiny-xlmr` an XLM-R with one."""
    from transformers import (BertConfig, BertForQuestionAnswering, XLMRobertaConfig,
                              XLMRobertaForQuestionAnswering)
    if name == "tiny":
        config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            attn_implementation="sdpa", **TINY_CONFIG)
        return BertForQuestionAnswering(config)
    # RoBERTa numbers positions from pad_token_id + 1: 512 tokens need 512 + pad + 1 rows (514 in
    # xlm-roberta-base)
    pad = tokenizer.pad_token_id
    dims = dict(TINY_CONFIG, max_position_embeddings=TINY_CONFIG["max_position_embeddings"] + pad + 1)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), pad_token_id=pad, type_vocab_size=1,
                              bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                              attn_implementation="sdpa", **dims)
    return XLMRobertaForQuestionAnswering(config)


@contextlib.contextmanager
def quiet_transformers(progress_bars=False):
    """transformers' logging at error level (no load report such as "Some weights ... are newly
    initialized") and, unless progress_bars, no progress bars, restored on exit: a model that
    fails to load is one error line. Keep the bars when a hub download may be under way."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars and not progress_bars:
            hf_logging.enable_progress_bar()


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


HUB_PROBE_TIMEOUT = 5  # seconds: is the model hub reachable at all? (else huggingface_hub retries
                       # a dead connection 5 times with back-off, ~15-30 s of warnings, then fails)


def _hub_offline(timeout=HUB_PROBE_TIMEOUT):
    """None when the model hub (HF_ENDPOINT, default https://huggingface.co) may be used, else
    why not, in a few words: offline mode is set, or the hub does not answer. Any HTTP answer,
    even an error status, counts as reachable; proxies are honoured (urllib reads the same
    *_PROXY variables as the hub client)."""
    import ssl
    import urllib.error
    import urllib.request
    from huggingface_hub import constants
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "on", "yes", "true"):
            return f"{var} is set"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):   # it answered; certificates are the hub's business
            return None
        return f"{constants.ENDPOINT}: {e.reason}"
    except (OSError, ValueError) as e:           # a timeout, a reset, a malformed HF_ENDPOINT
        return f"{constants.ENDPOINT}: {_first_line(e)}"
    return None


def load_model_and_tokenizer(name_or_path, texts=None, seed=0, require_qa_head=False):
    """`tiny` / `tiny-xlmr`: a random small BERT / XLM-R + a tokenizer trained on `texts`; else a
    hub name or a local dir (AutoModelForQuestionAnswering + fast AutoTokenizer), loaded quietly
    (quiet_transformers). With require_qa_head (distill.py, evaluate_mlqa.py), a checkpoint whose
    QA head would be freshly initialised (not a fine-tuned QA model) is an InputError; without it
    (phase 1 starts from a pre-trained encoder), a one-line note says the head is new. A directory
    that does not load (no or corrupt weights, shapes that do not match its config), a model type
    without a QA head class, or a tokenizer that is not fast (no character offsets) is an
    InputError. A hub name when the hub cannot be used (offline mode, or no answer within HUB_PROBE_TIMEOUT)
    loads from the local cache only: found, it loads; not, one line at once (no retries)."""
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING
    if name_or_path in TINY_MODELS:
        if not texts:
            raise InputError(f"--model {name_or_path} needs training text to build its tokenizer")
        tokenizer = tiny_tokenizer(name_or_path, texts)
        torch.manual_seed(seed)
        return build_tiny_model(name_or_path, tokenizer), tokenizer
    path = name_or_path                  # a hub name is "name" or "org/name"; anything else is a path
    local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1 or \
        ("/" in path and os.path.isdir(path.split("/")[0]))
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{path}: " + ("not a model directory (no config.json)"
                                        if os.path.isdir(path) else "no such model directory"))
    torch.manual_seed(seed)              # a new QA head (from a base model) is drawn from it
    # A hub name with no network: probe once, then use the local cache only (one line, at once).
    offline = None if local else _hub_offline()
    hub = {"local_files_only": True} if offline else {}
    with quiet_transformers(progress_bars=not local):
        try:
            config = AutoConfig.from_pretrained(name_or_path, **hub)
        except Exception as e:  # noqa: BLE001 - a config.json of the wrong shape is a TypeError,
            # or (transformers 5: fields of the wrong type) huggingface_hub's own validation error
            if offline:
                raise InputError(f"{name_or_path}: not in the local Hugging Face cache, and the "
                                 f"model hub is not reachable ({offline}); fetch it once where "
                                 "there is a network, or pass a local model directory") from None
            raise InputError(f"{name_or_path}: cannot read its model config ({_first_line(e)})") from None
        if type(config) not in MODEL_FOR_QUESTION_ANSWERING_MAPPING:
            raise InputError(f"{name_or_path}: model type '{config.model_type}' has no question-answering "
                             f"head class in transformers {transformers.__version__}")
        try:
            model, info = AutoModelForQuestionAnswering.from_pretrained(
                name_or_path, config=config, attn_implementation="sdpa", output_loading_info=True,
                **hub)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as e:
            # TypeError: a config field of the wrong type that transformers 4 does not check
            raise InputError(f"{name_or_path}: cannot load a question-answering model "
                             f"({_first_line(e)})") from None
        try:              # a malformed tokenizer.json fails with a bare Exception (or ImportError)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub)
        except Exception as e:  # noqa: BLE001 - any failure here is about the user's files
            raise InputError(f"{name_or_path}: cannot load its tokenizer, files missing or "
                             f"malformed ({_first_line(e.__context__ or e)})") from None
    check_tokenizer(name_or_path, tokenizer, config)
    if any("qa_outputs" in k for k in info.get("missing_keys", ())):
        if require_qa_head:
            raise InputError(f"{name_or_path}: not a fine-tuned QA model (its QA head is missing)")
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {name_or_path} has no QA head; it starts newly initialised (Sec. 4.1)")
    return model, tokenizer


def check_tokenizer(name, tokenizer, config):
    """A fast tokenizer (answers need its character offsets) that is the model's own."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{name}: its tokenizer ({type(tokenizer).__name__}) is not a fast "
                         "tokenizer; answers need a fast tokenizer's character offsets")
    if len(tokenizer) < getattr(config, "vocab_size", 0) / 2:   # transformers 5 makes one up
        raise InputError(f"{name}: cannot use its tokenizer, files missing or malformed "
                         f"({len(tokenizer)} tokens for a model of {config.vocab_size})")
    limit = getattr(tokenizer, "model_max_length", 0)             # (check_max_length compares it)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise InputError(f"{name}: cannot use its tokenizer, tokenizer_config.json malformed "
                         f"(model_max_length {json.dumps(limit)[:40]} is not a number)")
    if os.path.isdir(name) and not _tokenizer_class_named(name):
        check_tokenizer_json(name, tokenizer)


def _tokenizer_class_named(directory):
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        return isinstance(saved, dict) and isinstance(saved.get("tokenizer_class"), str)
    return False


TOKENIZER_PROBE = ("Who wrote Text 123?", "Bob wrote it in Paris, 2020.")


def check_tokenizer_json(directory, tokenizer):
    """A model directory whose tokenizer_config.json is missing, not a file, or names no
    tokenizer class: transformers 5 then builds the model type's default tokenizer, whose own
    settings (BERT's: lower-cased) replace those of tokenizer.json, so every answer is silently
    another model's. Refused when it splits a probe otherwise than tokenizer.json does."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return
    from tokenizers import Tokenizer
    with contextlib.suppress(Exception):            # a tokenizer.json that does not load alone
        if Tokenizer.from_file(path).encode(*TOKENIZER_PROBE).ids == \
                tokenizer(*TOKENIZER_PROBE)["input_ids"]:
            return
    raise InputError(f"{directory}: its tokenizer does not load as its tokenizer.json "
                     "(tokenizer_config.json missing or naming no tokenizer class: transformers "
                     "builds another one); restore tokenizer_config.json")


def load_checkpoint_model(out):
    """--resume: the run's model rebuilt from OUTPUT_DIR/checkpoint's config, and its tokenizer
    (the weights: Checkpoint.restore). sdpa as the first run: a config saved by transformers
    4.46-4.51 says "eager". A checkpoint whose config or tokenizer is damaged is one line."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer
    ckpt_dir = os.path.join(out, "checkpoint")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(ckpt_dir)
            model = AutoModelForQuestionAnswering.from_config(config, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    except Exception as e:  # noqa: BLE001 - any failure here is a missing or malformed file
        raise InputError(f"{ckpt_dir}: damaged, its config or tokenizer does not load "
                         f"({_first_line(e.__context__ or e)}); --overwrite starts the run "
                         "again") from None
    check_tokenizer(ckpt_dir, tokenizer, config)
    return model, tokenizer


def check_max_length(max_length, model, tokenizer):
    """--max-length within the positions the model has (512 for mBERT and XLM-R): found before
    any work, not at the first long window."""
    limit = min(tokenizer.model_max_length,
                getattr(getattr(model, "config", None), "max_position_embeddings", max_length))
    if max_length > limit:
        raise InputError(f"--max-length {max_length}: the model takes at most {limit} tokens")


def save_model(model, tokenizer, output_dir, overwrite=False, extra_files=None):
    """Atomic Hugging Face directory (config, model.safetensors, tokenizer); `extra_files`
    {name: JSON-able object} are written beside them."""
    model = getattr(model, "module", model)   # unwrap DDP
    for key in ("is_local", "local_files_only"):  # where transformers 5 read it from, not the
        tokenizer.init_kwargs.pop(key, None)      # tokenizer: a resumed run's files would differ
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(os.path.join(tmp, name), obj, indent=1)


# -------------------------------------------------------------------- features
def pair_template(tokenizer):
    """The tokenizer's own layout of a (question, context) pair, read from one encoded probe pair:
    the special tokens before the question, between question and context and after the context
    (ids and token types each), and the token type of the question's and the context's tokens.
    BERT: [CLS] q [SEP] c [SEP], types 0 then 1; RoBERTa / XLM-R: <s> q </s></s> c </s>, type 0."""
    enc = tokenizer("a", "b", return_token_type_ids=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    types = np.asarray(enc["token_type_ids"], dtype=np.int32)
    seq = np.array([-1 if s is None else s for s in enc.sequence_ids(0)])
    q, c = np.nonzero(seq == 0)[0], np.nonzero(seq == 1)[0]
    if not (len(q) and len(c) and (np.diff(q) == 1).all() and (np.diff(c) == 1).all() and q[-1] < c[0]):
        raise InputError(f"{type(tokenizer).__name__}: its pair template is not 'specials question "
                         "specials context specials'")
    if seq[0] != -1:      # position 0 is the label of a window without the answer
        raise InputError(f"{type(tokenizer).__name__}: its pair template does not start with a "
                         "special token ([CLS] or <s>) to label windows without the answer")
    parts = {"prefix": slice(0, q[0]), "middle": slice(q[-1] + 1, c[0]), "suffix": slice(c[-1] + 1, None)}
    template = {name: (ids[s], types[s]) for name, s in parts.items()}
    template.update(question_type=types[q[0]], context_type=types[c[0]])
    return template


def note_misplaced_answers(examples):
    """A training answer whose answer_start does not point at its text (outside the context, or
    at another span) would label the wrong tokens or [CLS]: one note with their count and the
    first id (rank 0), so a malformed data set is not trained on unseen."""
    def in_place(answer, context):
        return answer["answer_start"] >= 0 and context.startswith(answer["text"],
                                                                  answer["answer_start"])
    bad = [ex["id"] for ex in examples if ex["answers"] and not in_place(ex["answers"][0],
                                                                          ex["context"])]
    if bad and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {len(bad)} of {len(examples)} training answers are not at their "
              f"answer_start in the context (first: id {bad[0]}); they train on the wrong span "
              "or as no answer", flush=True)


def build_features(examples, tokenizer, max_length=MAX_LENGTH, stride=STRIDE, train=True,
                   max_query_length=MAX_QUERY_LENGTH, windows="fast"):
    """Tokenise question + context into overlapping windows (Sec. 3 input) with the tokenizer's own
    pair template (pair_template: [CLS] question [SEP] context window [SEP] for BERT,
    <s> question </s></s> context window </s> for XLM-R), windows of the context overlapping by
    `stride` tokens, exactly as the fast tokenizer's truncation="only_second" with overflow would
    cut them. A question is cut to its first `max_query_length` tokens (None: kept whole), as the
    authors' preprocessing does; only a question that leaves no room for the context is an error
    (naming the example by its "name" where it has one, else by its id).

    windows="legacy": the authors' phase-2 and evaluation processor (transformers 4.x
    squad_convert_examples_to_features): window k starts at context token k * `stride` (the
    stride is how far a window advances, not the overlap), until one reaches the context's end.

    Each distinct context and question is tokenised once (an MLQA context recurs with the questions
    of all seven languages; an XQuAD sample repeats each context ntl + 1 times), then the windows
    are assembled from the token arrays.

    Returns per window (feature): input_ids, token_type_ids (int32 arrays, unpadded), allowed
    (bool: context tokens + position 0, the support of Eq. 1's softmax), offsets ([L, 2] int32 char
    offsets into the context, (0, 0) outside it), example_index; with train, start/end_positions:
    the gold tokens of the first answer, or 0 ([CLS] / <s>) when the window does not hold it;
    context_start (the window's first context token); max_context (bool: the context tokens for
    which this window is the "max context" one, the legacy rule: the window where the token has
    the most tokens on its shorter side, + 0.01 x window length, the first on a tie).
    """
    if train:
        note_misplaced_answers(examples)
    if windows not in WINDOWS:
        raise InputError(f"--windows must be one of {' '.join(WINDOWS)}, got {windows!r}")
    def encode(texts):
        if not texts:
            return {}
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return {t: (np.asarray(ids, dtype=np.int32), np.asarray(off, dtype=np.int32).reshape(-1, 2))
                for t, ids, off in zip(texts, enc["input_ids"], enc["offset_mapping"])}
    contexts = encode(list(dict.fromkeys(ex["context"] for ex in examples)))
    questions = encode(list(dict.fromkeys(ex["question"].lstrip() for ex in examples)))
    template = pair_template(tokenizer)
    (pre_ids, pre_types), (mid_ids, mid_types), (suf_ids, suf_types) = \
        template["prefix"], template["middle"], template["suffix"]
    n_special = len(pre_ids) + len(mid_ids) + len(suf_ids)
    out = {k: [] for k in ("input_ids", "token_type_ids", "allowed", "offsets", "example_index",
                           "start_positions", "end_positions", "context_start", "max_context")}
    for i, ex in enumerate(examples):
        q_ids = questions[ex["question"].lstrip()][0][:max_query_length]
        c_ids, c_off = contexts[ex["context"]]
        room = max_length - len(q_ids) - n_special     # context tokens per window
        if room < 1 or (len(c_ids) > room and room <= stride):
            name = ex.get("name", f"question '{ex['id']}'")
            raise InputError(f"{name}: its {len(q_ids)} tokens (--max-query-length "
                             f"{max_query_length}) leave {max(room, 0)} context tokens per window of "
                             f"--max-length {max_length}, " + ("none" if room < 1 else
                                                               f"not more than --stride {stride}"))
        head_ids = np.concatenate([pre_ids, q_ids, mid_ids])
        head_types = np.concatenate([pre_types, np.full(len(q_ids), template["question_type"], np.int32),
                                     mid_types])
        head = len(head_ids)
        spans = context_windows(len(c_ids), room, stride, windows)
        best = max_context_window(spans, len(c_ids))
        for w, (lo, hi) in enumerate(spans):
            n = head + hi - lo + len(suf_ids)
            out["input_ids"].append(np.concatenate([head_ids, c_ids[lo:hi], suf_ids]).astype(np.int32))
            out["token_type_ids"].append(np.concatenate(
                [head_types, np.full(hi - lo, template["context_type"], np.int32), suf_types]))
            ctx = np.zeros(n, dtype=bool)
            ctx[head:head + hi - lo] = True
            offsets = np.zeros((n, 2), dtype=np.int32)
            offsets[head:head + hi - lo] = c_off[lo:hi]
            allowed = ctx.copy()
            allowed[0] = True                           # [CLS] / <s>: label of a window without the answer
            max_context = np.zeros(n, dtype=bool)
            max_context[head:head + hi - lo] = best[lo:hi] == w
            out["allowed"].append(allowed)
            out["max_context"].append(max_context)
            out["context_start"].append(lo)
            out["offsets"].append(offsets)
            out["example_index"].append(i)
            if train:
                s, e = gold_tokens(ex, offsets, ctx)
                out["start_positions"].append(s)
                out["end_positions"].append(e)
    for key in ("example_index", "start_positions", "end_positions", "context_start"):
        out[key] = np.asarray(out[key], dtype=np.int64)
    if not train:
        del out["start_positions"], out["end_positions"]
    return out


def context_windows(n_tokens, room, stride, windows="fast"):
    """[(lo, hi)] context-token ranges of the windows of a context of n_tokens, `room` tokens each.
    fast: consecutive windows overlap by `stride` tokens (the fast tokenizer's overflow);
    legacy: window k starts at k * stride (their processor). Both stop at the first window that
    reaches the end of the context."""
    step = room - stride if windows == "fast" else stride
    spans = []
    for lo in range(0, max(n_tokens, 1), max(step, 1)):
        spans.append((lo, min(lo + room, n_tokens)))
        if lo + room >= n_tokens:
            break
    return spans


def max_context_window(spans, n_tokens):
    """Per context token, the index of its "max context" window (the legacy rule, vectorised):
    score = min(tokens left of it, tokens right of it in the window) + 0.01 x window length,
    the first window on a tie."""
    lo = np.array([s[0] for s in spans])[:, None]
    length = np.array([s[1] - s[0] for s in spans])[:, None]
    pos = np.arange(n_tokens)[None, :]
    score = np.minimum(pos - lo, lo + length - 1 - pos) + 0.01 * length
    score = np.where((pos >= lo) & (pos < lo + length), score, -np.inf)
    return score.argmax(0) if n_tokens else np.zeros(0, dtype=np.int64)


def gold_tokens(example, offsets, ctx):
    """(start, end) token of the first answer inside this window, else (0, 0) = [CLS] / <s>."""
    if not example["answers"]:
        return 0, 0
    answer = example["answers"][0]
    s_char = answer["answer_start"]
    e_char = s_char + len(answer["text"])
    idx = np.nonzero(ctx)[0]
    if len(idx) == 0 or offsets[idx[0], 0] > s_char or offsets[idx[-1], 1] < e_char:
        return 0, 0
    start = idx[max(int((offsets[idx, 0] <= s_char).sum()) - 1, 0)]   # last token starting <= s
    end = idx[min(int((offsets[idx, 1] < e_char).sum()), len(idx) - 1)]  # first token ending >= e
    return int(start), int(end)


# -------------------------------------------------------------------- batching
def length_grouped_batches(lengths, batch_size, seed, epoch, shuffle=True, rank=0, world_size=1):
    """Batches of similar length: shuffle, cut into mega-batches of 50 batches, sort each by length,
    split, shuffle the batch order; deterministic in (seed, epoch). shuffle=False: sorted (inference).
    Under DDP each rank gets every world_size-th batch (the tail is dropped to keep ranks in step)."""
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm, mega = rng.permutation(len(lengths)), 50 * batch_size
    batches = []
    for i in range(0, len(perm), mega):
        chunk = perm[i:i + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if world_size > 1:
        batches = batches[:len(batches) // world_size * world_size][rank::world_size]
    return batches


def random_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """--batches random: a seeded random order of the windows cut into batches (the authors'
    RandomSampler), deterministic in (seed, epoch); under DDP each rank every world_size-th batch."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if world_size > 1:
        batches = batches[:len(batches) // world_size * world_size][rank::world_size]
    return batches


def batch_order(lengths, batch_size, seed, epoch, batches="grouped", rank=0, world_size=1):
    """One epoch's training batches: length_grouped_batches, or random_batches (--batches random)."""
    if batches not in BATCHES:
        raise InputError(f"--batches must be one of {' '.join(BATCHES)}, got {batches!r}")
    if batches == "random":
        return random_batches(len(lengths), batch_size, seed, epoch, rank, world_size)
    return length_grouped_batches(lengths, batch_size, seed, epoch, rank=rank, world_size=world_size)


def pad_length(max_length, batches="grouped", softmax_support="context", map_k_relevant="masked"):
    """The length every batch is padded to: None (the longest window of the batch) by default;
    --max-length when an option needs the authors' fixed-length windows (their padding positions
    are in the softmax, the mAP@k ranking and the batch)."""
    legacy = batches == "random" or softmax_support == "all" or map_k_relevant == "authors"
    return max_length if legacy else None


def pad_multiple(device, precision, max_length):
    """Batches are padded up to a multiple of this many tokens (collate's `multiple`):
    CPU_BF16_PAD_MULTIPLE for bf16 on a CPU, whose bf16 kernels (softmax, adds, matmul tails) run
    slower on lengths that are not (bf16 phase-2 steps ~8% faster on AMD EPYC; PERFORMANCE.md); 1
    otherwise, so fp32 and GPU runs are as before. Only when max_length is a multiple too, so that
    no batch grows past --max-length (the model's positions). The added positions are padding:
    masked in attention and in Eq. 1, the same results up to bf16 rounding."""
    bf16_cpu = precision == "bf16" and torch.device(device).type == "cpu"
    return CPU_BF16_PAD_MULTIPLE if bf16_cpu and max_length % CPU_BF16_PAD_MULTIPLE == 0 else 1


def collate(features, indices, pad_token_id, device, pad_to=None, multiple=1):
    """Tensors for the features `indices`, padded to the longest of them rounded up to a multiple
    of `multiple` (pad_multiple), or to pad_to when longer (the authors' fixed-length windows)."""
    ids = [features["input_ids"][i] for i in indices]
    longest = max(len(x) for x in ids)
    n, length = len(ids), max(-(-longest // multiple) * multiple, pad_to or 0)
    input_ids = np.full((n, length), pad_token_id, dtype=np.int64)
    token_type_ids = np.zeros((n, length), dtype=np.int64)
    allowed = np.zeros((n, length), dtype=bool)
    attention_mask = np.zeros((n, length), dtype=np.int64)
    max_context = np.zeros((n, length), dtype=bool) if "max_context" in features else None
    for row, i in enumerate(indices):
        m = len(ids[row])
        input_ids[row, :m] = ids[row]
        token_type_ids[row, :m] = features["token_type_ids"][i]
        allowed[row, :m] = features["allowed"][i]
        attention_mask[row, :m] = 1
        if max_context is not None:
            max_context[row, :m] = features["max_context"][i]
    batch = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                 allowed=allowed)
    if max_context is not None:
        batch["max_context"] = max_context
    for key in ("start_positions", "end_positions"):
        if key in features:
            batch[key] = features[key][np.asarray(indices)]
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True)
            for k, v in batch.items()}


# -------------------------------------------------------------------- model output and loss
def autocast(device, precision="auto"):
    """The forward's numeric precision: "auto" = bf16 autocast on CUDA, nothing on a CPU (CPU runs
    stay exact and repeatable); "fp32" = nothing; "bf16" = bf16 autocast on either (a CPU with
    AMX-BF16 runs it ~2x faster). Parameters, gradients and the optimiser stay float32."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {' '.join(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type     # tf32: no autocast (set_matmul_precision's)
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_matmul_precision(precision, device=None):
    """The float32 matmul precision of this stage, from its own --precision (never what an earlier
    stage of the same process set): fp32 = true fp32 ("highest", as the authors' torch); tf32 =
    TF32 on Ampere and newer GPUs ("high"); auto and bf16 keep "high" for the float32 work
    outside autocast. bf16 on a CPU without bf16 matmul kernels: a note (note_slow_bf16)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {' '.join(PRECISIONS)}, got {precision!r}")
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")
    note_slow_bf16(precision, torch.device(device).type if device else default_device().type)


def default_device(device=None):
    """`device` (--device), or where a run goes without one: the GPU when there is one. A device
    this machine lacks is one line, not a traceback when the first tensor moves there."""
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"--device {device}: not a device name (cpu, cuda, cuda:N, ...)") from None
    if chosen.type == "cuda" and not (torch.cuda.is_available() and
                                      (chosen.index or 0) < torch.cuda.device_count()):
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (torch {torch.__version__})")
    if chosen.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: this project runs on cpu and cuda devices")
    return chosen


def cpu_has_bf16():
    """Whether this CPU has oneDNN's bf16 matmul kernels (AVX-512 or AMX). Without them (AVX2
    only) torch multiplies bf16 matrices in a generic loop, ~100x slower than fp32's kernels
    (1.1 against 155 GFLOP/s on a 2-core AMD EPYC with AVX2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):      # a torch without the probe: assume it has them
        return True


@functools.cache                                # once per process, not per stage
def note_slow_bf16(precision, device_type):
    """One line on stderr for bf16 on a CPU without cpu_has_bf16: the user asked for it, so it
    runs, but knowing why it is slow."""
    if precision != "bf16" or device_type != "cpu" or cpu_has_bf16():
        return
    print("note: this CPU has no bf16 matmul kernels (they need AVX-512 or AMX): --precision bf16 "
          "runs tens of times slower than fp32 here; --precision fp32 (a CPU's default) is the "
          "fast one", file=sys.stderr, flush=True)


def compile_forward(*models):
    """--compile: torch.compile each model's forward in place (Module.compile: the state_dict,
    checkpoints and a teacher's load_state_dict stay as they are), with dynamic shapes, so the
    windows' many lengths share one compiled graph instead of one each. Same loss and gradients
    as eager within rounding (test_distill_compile_matches_eager); None entries are skipped."""
    for model in models:
        if model is not None:
            model.compile(dynamic=True)


def takes_token_types(model):
    """Token types go to the model only where it has more than one (BERT: 2; RoBERTa / XLM-R: 1,
    and DistilBERT-like configs have none). A bare module without a config takes them."""
    config = getattr(getattr(model, "module", model), "config", None)
    return config is None or getattr(config, "type_vocab_size", 1) > 1


def qa_logits(model, batch, precision="auto", softmax_support="context"):
    """Start/end logits, float32 [B, L]; disallowed positions (question, separators, padding) are
    MASK_VALUE, so a softmax over them is Eq. 1's softmax over the context tokens (+ [CLS] / <s>).
    This is the one place where Eq. 1's mask is applied: the losses take these logits as they are.
    softmax_support="all": no mask, every position of the (padded) window, as the authors' loss."""
    if softmax_support not in SOFTMAX_SUPPORTS:
        raise InputError(f"--softmax-support must be one of {' '.join(SOFTMAX_SUPPORTS)}, "
                         f"got {softmax_support!r}")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if takes_token_types(model):
        inputs["token_type_ids"] = batch["token_type_ids"]
    device = batch["input_ids"].device
    with autocast(device, precision), cpu_dropout.cpu_ops(model, device):
        out = model(**inputs)
    if softmax_support == "all":
        return out.start_logits.float(), out.end_logits.float()
    mask = ~batch["allowed"]
    return (out.start_logits.float().masked_fill(mask, MASK_VALUE),
            out.end_logits.float().masked_fill(mask, MASK_VALUE))


def ce_loss(start_logits, end_logits, start_positions, end_positions):
    """Eq. 2: cross-entropy of the gold start and end under Eq. 1, averaged over start/end and batch."""
    return (F.cross_entropy(start_logits, start_positions) +
            F.cross_entropy(end_logits, end_positions)) / 2


# -------------------------------------------------------------------- optimisation and DDP
def make_optimizer(model, lr, weight_decay=0.01):
    """AdamW; no decay on biases and LayerNorm weights (the 1-d parameters). Fused: one kernel for
    all parameters, on CUDA and on CPU (8x faster than the per-parameter loop on this CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype in (torch.float32, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def make_scheduler(optimizer, total_steps, warmup_steps=0):
    """Linear warm-up then linear decay to 0 at total_steps: Hugging Face's
    get_linear_schedule_with_warmup (the authors' schedule, with their warm-up of 0), step 0 at
    lr 0 when there is a warm-up."""
    def factor(step):
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, scheduler):
    """Gradient clipping at MAX_GRAD_NORM, AdamW step, schedule step, gradients cleared."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def setup_distributed():
    """(rank, world_size, device, is_master): torchrun env -> DDP (nccl on GPU, gloo on CPU)."""
    if "RANK" not in os.environ:
        return 0, 1, default_device(), True
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():      # else a CUDA error in set_device
            raise InputError(f"torchrun: local rank {local_rank}, but this node has "
                             f"{torch.cuda.device_count()} CUDA device(s): one process per GPU "
                             f"(--nproc-per-node {torch.cuda.device_count()} at most)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():   # a second call (distill.py after phase 1) reuses it
        # a long MLQA-dev evaluation, or a rank waiting in prepare.py: allow an hour
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=1))
    return rank, world_size, device, rank == 0


def train(model, features, pad_token_id, epochs=EPOCHS, lr=LR, batch_size=BATCH_SIZE, grad_accum=1,
          seed=0, weight_decay=WEIGHT_DECAY, warmup_steps=0, device="cpu", rank=0, world_size=1,
          progress=True, precision="auto", batches="grouped", softmax_support="context",
          max_length=MAX_LENGTH, run=None, compile=False):
    """The loop: length-grouped batches, Eq. 2 loss, AdamW + linear decay, grad accumulation, DDP.
    `batch_size` is the effective batch of one optimiser step; `precision` that of the forward
    (autocast). batches="random" / softmax_support="all": the authors' random batches of windows
    padded to max_length / their loss over all positions. `run` (a Phase1Run, from run()):
    train_log.jsonl, checkpoints at every epoch's end and mid-epoch (--save-steps, a stop
    signal), --resume. compile: torch.compile the forward (--compile, compile_forward).
    Returns the unwrapped model."""
    micro = micro_batch(batch_size, world_size, grad_accum)
    torch.manual_seed(seed + rank)                # dropout stream
    model.to(device).train()
    if compile:
        compile_forward(model)
    raw = model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    lengths = np.array([len(x) for x in features["input_ids"]])
    pad_to = pad_length(max_length, batches, softmax_support)
    multiple = pad_multiple(device, precision, max_length)
    per_epoch = len(batch_order(lengths, micro, seed, 0, batches, rank=rank, world_size=world_size))
    steps_per_epoch = math.ceil(per_epoch / grad_accum)
    optimizer = make_optimizer(raw, lr, weight_decay)
    scheduler = make_scheduler(optimizer, steps_per_epoch * epochs, warmup_steps)
    run = run or Phase1Run(None)
    epoch0, step, skip = run.start(raw, optimizer, scheduler, rank, world_size)
    log = Phase1Log(run.out, rank == 0 and progress, epochs, steps_per_epoch, epoch0, skip)
    with run.stop.deferred():                     # a signal ends the step, saves, exits (rundir)
        for epoch in range(epoch0, epochs):
            order = batch_order(lengths, micro, seed, epoch, batches, rank=rank,
                                world_size=world_size)
            steps = [order[i:i + grad_accum] for i in range(0, len(order), grad_accum)]
            for i, step_batches in enumerate(steps):
                if i < skip:                      # done before the checkpoint (--resume)
                    continue
                total = torch.zeros((), device=device)
                for j, idx in enumerate(step_batches):
                    batch = collate(features, idx, pad_token_id, device, pad_to, multiple)
                    last = j + 1 == len(step_batches)
                    sync = model.no_sync() if world_size > 1 and not last else contextlib.nullcontext()
                    with sync:
                        start, end = qa_logits(model, batch, precision, softmax_support)
                        loss = ce_loss(start, end, batch["start_positions"], batch["end_positions"])
                        (loss / len(step_batches)).backward()     # the last step may be short
                    total += loss.detach() / len(step_batches)
                step += 1
                loss = mean_loss(total, world_size)
                check_finite(loss, step, epoch, run.checkpoint and run.checkpoint.state_path)
                log.step(step, epoch, scheduler.get_last_lr()[0], loss,
                         sum(len(idx) for idx in step_batches) * world_size)
                optimizer_step(raw, optimizer, scheduler)
                run.after_step(epoch, step, i + 1, len(steps), world_size, device, log)
            skip = 0
            run.epoch_done(epoch, step, world_size)
            log.epoch_done(epoch, step)
    log.close()
    return raw


def check_finite(loss, step, epoch, state_path):
    """A NaN or infinite loss stops the run (NonFiniteLoss: exit status 3) before the optimiser
    step spreads it into the weights; the last checkpoint (if any: an epoch's end or a
    --save-steps save) stays as it was. --resume would most likely meet the same loss again (on a
    CPU it repeats the steps exactly), and a lower --lr is a new run: hence --overwrite."""
    if not math.isfinite(loss):
        kept = f"the last checkpoint ({state_path}) is as it was; " \
            if state_path and os.path.isfile(state_path) else "no checkpoint was saved yet; "
        raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step}, epoch {epoch + 1}; stopped "
                            f"before the weights took it; {kept}a --resume would most likely "
                            f"meet it again: start again with --overwrite and a lower --lr")


def micro_batch(batch_size, world_size, grad_accum):
    """Rows of one micro-batch per process: --batch-size = world size x micro x --grad-accum."""
    micro = batch_size // (world_size * grad_accum)
    if micro < 1 or micro * world_size * grad_accum != batch_size:
        raise InputError(f"--batch-size {batch_size} is not a multiple of world size {world_size} "
                         f"x --grad-accum {grad_accum}")
    return micro


def mean_loss(loss, world_size):
    """The step's loss averaged over the DDP processes, as a float (one host sync per step)."""
    if world_size > 1:
        torch.distributed.all_reduce(loss)
        loss = loss / world_size
    return loss.item()


class Phase1Run:
    """What makes phase 1 a resumable run in `out` (None: a bare training loop, e.g. in tests):
    the checkpoint, --resume, --save-steps and the stop signals (rundir)."""

    def __init__(self, out, resume=False, save_steps=0, options=None, resume_with=None,
                 stop=None):
        self.out, self.resume, self.options, self.resume_with = out, resume, options, resume_with
        self.clock, self.stop = SaveClock(save_steps), stop or StopSignals()
        self.checkpoint, self.is_master = None, True

    def start(self, model, optimizer, scheduler, rank, world_size):
        """-> (epochs done, steps done, steps done in the unfinished epoch)."""
        self.is_master = rank == 0
        if self.out is None:
            return 0, 0, 0
        self.checkpoint = Checkpoint(self.out, {"model": model}, optimizer, scheduler,
                                     self.resume_with)
        if not self.resume:
            return 0, 0, 0
        state = self.checkpoint.restore(rank, world_size, self.is_master, self.options)
        if self.is_master:        # forget what the interrupted run logged after the checkpoint
            truncate_log(os.path.join(self.out, "train_log.jsonl"), "step", state["step"])
        return state["epoch"], state["step"], state["in_epoch"]

    def after_step(self, epoch, step, in_epoch, steps_in_epoch, world_size, device, log):
        if self.checkpoint is None:
            return
        signum, save_now = self.stop.agree(self.clock.due(step), world_size, device)
        if signum or (save_now and in_epoch < steps_in_epoch):      # a mid-epoch checkpoint
            self.save(epoch, step, in_epoch, world_size)
        if signum:
            log.close()
            stop_after_save(signum, self.checkpoint, self.is_master)

    def epoch_done(self, epoch, step, world_size):
        if self.checkpoint is not None:
            self.save(epoch + 1, step, 0, world_size)

    def save(self, epochs_done, step, in_epoch, world_size):
        self.checkpoint.save(epochs_done, step, in_epoch, self.options, world_size, self.is_master)
        self.clock.saved()


class Phase1Log:
    """Rank 0's record of phase 1: train_log.jsonl (step, epoch, lr, loss) when there is an
    output directory, a progress bar on a terminal, otherwise a line every few minutes (step,
    loss, windows/s, ETA), and a line per epoch."""

    def __init__(self, out, enabled, epochs, steps_per_epoch, epoch0, skip):
        self.enabled, self.epochs, self.steps_per_epoch = enabled, epochs, steps_per_epoch
        self.file = open(os.path.join(out, "train_log.jsonl"), "a", encoding="utf-8") \
            if out and enabled else None
        self.bar = tqdm(total=steps_per_epoch * epochs, initial=epoch0 * steps_per_epoch + skip,
                        unit="step", disable=None if enabled else True)   # quiet when not a TTY
        self.lines = ProgressLines(enabled)
        self.t0, self.windows, self.done = time.time(), 0, 0

    def step(self, step, epoch, lr, loss, windows):
        self.windows, self.done = self.windows + windows, self.done + 1
        if not self.enabled:
            return
        if self.file:
            append_row(self.file, {"step": step, "epoch": epoch + 1, "lr": lr, "loss": loss})
        elapsed = time.time() - self.t0
        self.bar.update(1)
        if self.done % LOG_EVERY == 0:
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}",
                                 windows_per_s=f"{self.windows / elapsed:.0f}")
        left = (self.steps_per_epoch * self.epochs - step) * elapsed / self.done
        self.lines.maybe(lambda: f"epoch {epoch + 1}/{self.epochs} step {step}/"
                                 f"{self.steps_per_epoch * self.epochs}: loss {loss:.4f}, "
                                 f"{self.windows / elapsed:.1f} windows/s, ETA {left / 60:.1f} min")

    def epoch_done(self, epoch, step):
        if self.enabled and self.file is not None:
            print(f"epoch {epoch + 1}/{self.epochs}: step {step}, "
                  f"{time.time() - self.t0:.0f}s", flush=True)

    def close(self):
        self.bar.close()
        if self.file and not self.file.closed:
            self.file.close()


# -------------------------------------------------------------------- prediction
def extract_spans(start_logits, end_logits, allowed, n_best=N_BEST, max_answer_tokens=MAX_ANSWER_TOKENS,
                  top=1):
    """Best spans per feature, vectorised (Sec. 3: end before start excluded): the n_best start and
    end candidates among allowed context positions ([CLS] excluded), scored start + end as
    [B, n, n], kept when start <= end < start + max_answer_tokens. Returns (scores, starts, ends)
    [B, top]; a slot without a valid span has score -inf and positions 0."""
    allowed = allowed.clone()
    allowed[:, 0] = False
    neg = torch.tensor(float("-inf"), device=start_logits.device)
    k = min(n_best, start_logits.shape[1])
    s_val, s_idx = torch.where(allowed, start_logits.float(), neg).topk(k, dim=1)
    e_val, e_idx = torch.where(allowed, end_logits.float(), neg).topk(k, dim=1)
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1                      # [B, k, k]
    scores = s_val[:, :, None] + e_val[:, None, :]
    scores = scores.masked_fill((length < 1) | (length > max_answer_tokens), float("-inf"))
    best, flat = scores.flatten(1).topk(min(top, k * k), dim=1)
    none = ~torch.isfinite(best)
    return (best, s_idx.gather(1, flat // k).masked_fill(none, 0),
            e_idx.gather(1, flat % k).masked_fill(none, 0))


def legacy_spans(start_logits, end_logits, context, max_context, n_best=N_BEST,
                 max_answer_tokens=MAX_ANSWER_TOKENS):
    """--answers legacy: the candidate spans of each window as the authors' post-processing
    (transformers 4.x compute_predictions_logits) finds them, vectorised: the n_best start and end
    positions over ALL positions of the padded window (by logit, the lower position first on a
    tie), then kept when both lie in the context, the start's window is its "max context" window
    (build_features), and start <= end < start + max_answer_tokens. Returns (scores float64
    [B, n*n], -inf where dropped, starts, ends) in their loop order: start rank, then end rank."""
    k = min(n_best, start_logits.shape[1])
    s_val, s_idx = (x[:, :k] for x in start_logits.float().sort(dim=1, descending=True, stable=True))
    e_val, e_idx = (x[:, :k] for x in end_logits.float().sort(dim=1, descending=True, stable=True))
    ok_s = context.gather(1, s_idx) & max_context.gather(1, s_idx)
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1                      # [B, k, k]
    ok = ok_s[:, :, None] & context.gather(1, e_idx)[:, None, :] & (length >= 1) & \
        (length <= max_answer_tokens)
    scores = (s_val.double()[:, :, None] + e_val.double()[:, None, :]).masked_fill(~ok, float("-inf"))
    return (scores.flatten(1), s_idx[:, :, None].expand(-1, -1, k).flatten(1),
            e_idx[:, None, :].expand(-1, k, -1).flatten(1))


@functools.lru_cache(maxsize=2)
def _basic_tokenizer(lower):
    """BERT's basic tokenisation (the Rust twin of transformers 4.x BasicTokenizer): control
    characters dropped, CJK characters and punctuation split off, whitespace split."""
    from tokenizers import normalizers, pre_tokenizers
    return (normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                       lowercase=lower), pre_tokenizers.BertPreTokenizer())


def basic_tokens(text, lower=False):
    """The words of BERT's basic tokenisation of `text` (NFC first, as transformers 4.x does)."""
    normalizer, pre = _basic_tokenizer(lower)
    return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(unicodedata.normalize("NFC", text)))]


def align_to_original(pred_text, orig_text, lower=False):
    """The legacy get_final_text: project `pred_text` (rebuilt from tokens) onto `orig_text` (the
    whitespace-separated words it came from) character by character, through the basic
    tokenisation of orig_text; orig_text itself when the two cannot be aligned."""
    tok_text = " ".join(basic_tokens(orig_text, lower))
    start = tok_text.find(pred_text)
    if start < 0:
        return orig_text
    orig_chars = np.flatnonzero(np.array(list(orig_text)) != " ")     # positions of non-spaces
    tok_chars = np.flatnonzero(np.array(list(tok_text)) != " ")
    if len(orig_chars) != len(tok_chars):
        return orig_text
    end = start + len(pred_text) - 1
    rank = np.searchsorted(tok_chars, [start, end])                    # their non-space index
    if not (rank < len(tok_chars)).all() or (tok_chars[rank] != [start, end]).any():
        return orig_text                                               # starts or ends on a space
    return orig_text[orig_chars[rank[0]]:orig_chars[rank[1]] + 1]


def legacy_text(tokenizer, ids, offsets, start, end, words, word_starts, lower=False):
    """The text of the span start..end of one window as the legacy post-processing rebuilds it:
    the tokens detokenised (the tokenizer's own convert_tokens_to_string, whitespace collapsed),
    aligned onto the context words they came from (align_to_original)."""
    tokens = tokenizer.convert_ids_to_tokens([int(x) for x in ids[start:end + 1]])
    tok_text = " ".join(tokenizer.convert_tokens_to_string(tokens).split())
    first, last = np.searchsorted(word_starts, offsets[[start, end], 0], side="right") - 1
    return align_to_original(tok_text, " ".join(words[first:last + 1]), lower)


def context_words(context):
    """The words of a context as the legacy SquadExample splits it (on space, tab, CR, LF and
    U+202F only) -> (words, their start characters)."""
    found = list(re.finditer(r"[^ \t\r\n\u202f]+", context))
    return [m.group() for m in found], np.array([m.start() for m in found], dtype=np.int64)


def legacy_answers(model, tokenizer, examples, features, batch_size, device, n_best_size, precision,
                   with_scores, max_length):
    """predict(answers="legacy"): windows padded to max_length, legacy_spans of each, then per
    example the candidates of all its windows by score (their stable sort: window, start rank,
    end rank on a tie), each rebuilt as text (legacy_text) until n distinct texts (20 with
    scores: the probability is a softmax over these kept spans' scores, as their n-best). No
    candidate at all: their nonce answer "empty"."""
    n, width = len(features["input_ids"]), N_BEST * N_BEST
    scores = np.full((n, width), -np.inf)
    starts, ends = np.zeros((n, width), np.int64), np.zeros((n, width), np.int64)
    lengths = [len(x) for x in features["input_ids"]]
    for idx in length_grouped_batches(lengths, batch_size or eval_batch_size(device), 0, 0, shuffle=False):
        batch = collate(features, idx, tokenizer.pad_token_id, device, pad_to=max_length)
        start_logits, end_logits = qa_logits(model, batch, precision, softmax_support="all")
        context = batch["allowed"].clone()
        context[:, 0] = False
        s, a, b = legacy_spans(start_logits, end_logits, context, batch["max_context"])
        w = s.shape[1]
        scores[idx, :w], starts[idx, :w], ends[idx, :w] = s.cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()
    lower = bool(getattr(tokenizer, "do_lower_case", False))
    want = N_BEST if with_scores else n_best_size
    bounds = np.searchsorted(features["example_index"], np.arange(len(examples) + 1))
    words, out = {}, {}
    for i, ex in enumerate(examples):                        # a loop over examples, not tokens
        rows = np.arange(bounds[i], bounds[i + 1])
        flat = scores[rows].ravel()
        keep = np.flatnonzero(np.isfinite(flat))
        keep = keep[np.lexsort((keep, -flat[keep]))]          # by score; their list order on a tie
        if ex["context"] not in words:
            words[ex["context"]] = context_words(ex["context"])
        nbest = {}
        for c in keep:
            if len(nbest) >= want:
                break
            f, j = rows[c // width], c % width
            text = legacy_text(tokenizer, features["input_ids"][f], features["offsets"][f],
                               starts[f, j], ends[f, j], *words[ex["context"]], lower)
            nbest.setdefault(text, flat[c])                   # a text seen before: skipped
        nbest = nbest or {"empty": 0.0}                       # their nonce prediction
        texts = list(nbest)
        if n_best_size > 1:
            out[ex["id"]] = texts[:n_best_size]
        elif with_scores:
            total = np.array(list(nbest.values()))
            out[ex["id"]] = (texts[0], float(1.0 / np.exp(total - total[0]).sum()))
        else:
            out[ex["id"]] = texts[0]
    return out


def eval_batch_size(device):
    """Inference batch: 128 windows on a GPU, 16 on a CPU (cache-bound: 8-16 rows per pass ran
    1.1-1.4x faster than 24-64 in bench.py's tiny and small shapes on a 2-core machine)."""
    return 128 if torch.device(device).type == "cuda" else 16


@torch.inference_mode()
def predict(model, tokenizer, examples, batch_size=None, device=None, n_best_size=1, features=None,
            precision="auto", max_query_length=MAX_QUERY_LENGTH, with_scores=False, answers="offsets",
            windows="fast", max_length=MAX_LENGTH):
    """id -> answer text: the best span over all windows of the example, cut from the original
    context by character offsets. n_best_size > 1: id -> list of up to n distinct answer texts,
    best first (paper Table 1). Examples without any valid span get "" (or []). `precision`: that
    of the forward (autocast); `max_query_length` applies when the features are built here.
    with_scores (n_best_size 1): id -> (text, p_start * p_end of the span under its window's
    Eq. 1 softmax, [CLS] included; 0.0 without a span).
    answers="legacy": the authors' post-processing instead (legacy_answers: top 20 over all
    positions of windows padded to max_length, max-context rule, text rebuilt from tokens, the
    probability over their n-best). windows: of the features built here."""
    if answers not in ANSWERS:
        raise InputError(f"--answers must be one of {' '.join(ANSWERS)}, got {answers!r}")
    device = default_device(device)
    model = getattr(model, "module", model).to(device)
    was_training = model.training
    model.eval()
    if features is None:
        features = build_features(examples, tokenizer, max_length, train=False,
                                  max_query_length=max_query_length, windows=windows)
    if answers == "legacy":
        out = legacy_answers(model, tokenizer, examples, features, batch_size, device, n_best_size,
                             precision, with_scores, max_length)
        model.train(was_training)
        return out
    top = n_best_size if n_best_size == 1 else min(4 * n_best_size, N_BEST * N_BEST)
    n = len(features["input_ids"])
    scores, starts, ends = (np.full((n, top), -np.inf, np.float32), np.zeros((n, top), np.int64),
                            np.zeros((n, top), np.int64))
    log_norm = np.zeros(n, np.float32)                        # log of Eq. 1's two denominators
    lengths = [len(x) for x in features["input_ids"]]
    multiple = pad_multiple(device, precision, max_length)
    for idx in length_grouped_batches(lengths, batch_size or eval_batch_size(device), 0, 0, shuffle=False):
        batch = collate(features, idx, tokenizer.pad_token_id, device, multiple=multiple)
        start_logits, end_logits = qa_logits(model, batch, precision)
        s, a, b = extract_spans(start_logits, end_logits, batch["allowed"], top=top)
        scores[idx, :s.shape[1]], starts[idx, :s.shape[1]], ends[idx, :s.shape[1]] = \
            s.cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()
        log_norm[idx] = (start_logits.logsumexp(1) + end_logits.logsumexp(1)).cpu().numpy()
    char_s = np.stack([features["offsets"][f][starts[f], 0] for f in range(n)]) if n else starts
    char_e = np.stack([features["offsets"][f][ends[f], 1] for f in range(n)]) if n else ends
    ex_index = np.repeat(features["example_index"], top)
    probability = np.exp(scores - log_norm[:, None]).ravel()
    scores, char_s, char_e = scores.ravel(), char_s.ravel(), char_e.ravel()
    order = np.lexsort((-scores, ex_index))                  # by example, best candidate first
    first = np.unique(ex_index[order], return_index=True)[1]
    empty = ("", 0.0) if with_scores else ""
    out = {ex["id"]: (empty if n_best_size == 1 else []) for ex in examples}
    if n_best_size == 1:                                     # the first row of each example wins
        for r in order[first][np.isfinite(scores[order[first]])]:
            ex = examples[ex_index[r]]
            text = ex["context"][char_s[r]:char_e[r]]
            out[ex["id"]] = (text, float(probability[r])) if with_scores else text
    else:                                                    # a loop over examples, not tokens
        for rows in np.split(order, first[1:]) if len(order) else []:
            ex = examples[ex_index[rows[0]]]
            texts = [ex["context"][char_s[r]:char_e[r]] for r in rows if np.isfinite(scores[r])]
            out[ex["id"]] = list(dict.fromkeys(texts))[:n_best_size]  # distinct, rank order kept
    model.train(was_training)
    return out


# -------------------------------------------------------------------- offset-recovery report
def check_offsets(xquad_dir=XQUAD_DIR, model="tiny"):
    """Per XQuAD language: windows that hold the gold answer, the share whose gold token span maps
    back (through the offsets) to text containing the answer, and the share that is exact."""
    files = sorted(glob.glob(os.path.join(xquad_dir, "xquad.*.json")))
    if not files:
        raise InputError(f"{xquad_dir}: no xquad.*.json files")
    rows, tokenizer = [], None if model in TINY_MODELS else load_model_and_tokenizer(model)[1]
    for path in files:
        examples = load_squad_examples(path)
        if model in TINY_MODELS:                  # a tokenizer trained on this language's text
            tokenizer = tiny_tokenizer(model, [x for ex in examples for x in (ex["question"], ex["context"])])
        feats = build_features(examples, tokenizer)
        held = np.nonzero(feats["start_positions"] > 0)[0]
        contains = exact = 0
        for f in held:
            ex = examples[feats["example_index"][f]]
            gold = ex["answers"][0]["text"]
            off = feats["offsets"][f]
            text = ex["context"][off[feats["start_positions"][f], 0]:off[feats["end_positions"][f], 1]]
            contains += gold in text
            exact += text == gold
        covered = len(np.unique(feats["example_index"][held]))
        rows.append(dict(lang=path.split(".")[-2], examples=len(examples), answered=covered,
                         windows=len(held), contains=contains / max(1, len(held)),
                         exact=exact / max(1, len(held))))
    return rows


# -------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG)
    t = p.add_argument_group("training (Sec. 4.1, 5.2)")
    t.add_argument("--model", default=None, help=f"hub name, local dir, or 'tiny' / 'tiny-xlmr' "
                                                 f"(random small models, offline) (default: {MODEL})")
    t.add_argument("--train-file", default=SQUAD_TRAIN_FILE)
    t.add_argument("--epochs", type=int, default=EPOCHS)
    t.add_argument("--lr", type=float, default=LR)
    t.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="effective batch per step")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--max-examples", type=int, default=None, help="keep the first N examples")
    t.add_argument("--max-length", type=int, default=MAX_LENGTH)
    t.add_argument("--stride", type=int, default=STRIDE)
    t.add_argument("--max-query-length", type=int, default=MAX_QUERY_LENGTH, help="question tokens kept")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU; fp32: true fp32 matmuls; "
                        "tf32: TF32 matmuls on Ampere+")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the forward (needs a C compiler on a CPU; the first step "
                        "compiles); off by default")
    f = p.add_argument_group("the authors' computation (README: fidelity notes)")
    f.add_argument("--windows", choices=WINDOWS, default="fast",
                   help="legacy: a window starts every --stride tokens (the authors' phase-2 processor)")
    f.add_argument("--softmax-support", choices=SOFTMAX_SUPPORTS, default="context",
                   help="all: the loss over every position of a window padded to --max-length (authors')")
    f.add_argument("--batches", choices=BATCHES, default="grouped",
                   help="random: seeded random batches padded to --max-length (authors')")
    f.add_argument("--as-authors", action="store_true",
                   help="the authors' phase 1: " + " ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in AS_AUTHORS.items()) +
                        " (None: questions not cut); options given explicitly win")
    o = p.add_argument_group("output, checkpoints, resuming")
    o.add_argument("--output-dir", default=OUTPUT_DIR)
    add_output_options(o, "train_qa.py", 3)    # --overwrite --resume --save-steps --keep-checkpoint
    c = p.add_argument_group("offset-recovery report (instead of training)")
    c.add_argument("--check-offsets", action="store_true", help="print the offset-recovery report")
    c.add_argument("--xquad-dir", default=XQUAD_DIR)
    return parse_with_preset(p, argv, AS_AUTHORS)


EPILOG = ("Exit status: 0 done, 2 bad input, an unwritable output or out of memory, 3 a non-finite\n"
          "loss, 130/143/138 stopped by SIGINT/SIGTERM/SIGUSR1 (during training: the checkpoint is "
          "saved first;\n--resume continues).")


def main(argv=None):
    args = parse_args(argv)
    if args.check_offsets:
        print(f"{'lang':4} {'examples':>8} {'answered':>8} {'windows':>7} {'contains':>8} {'exact':>6}")
        for r in check_offsets(args.xquad_dir, args.model or "tiny"):
            print(f"{r['lang']:4} {r['examples']:8d} {r['answered']:8d} {r['windows']:7d} "
                  f"{100 * r['contains']:7.2f}% {100 * r['exact']:5.2f}%")
        return
    run(args)
    finish()


def run(args, resume_with=None):
    """Phase 1 from parse_args' options: check, train, install the model (the master). Under
    torchrun it joins the process group, or the one already initialised, and leaves it open:
    distill.py runs phase 1 this way inside its own process (prepare.py) before phase 2, with
    `resume_with` saying how to continue it after a stop."""
    check_args(args)
    examples = load_squad_examples(args.train_file)[:args.max_examples]
    if not examples:
        raise InputError(f"{args.train_file}: no examples")
    rank, world_size, device, is_master = setup_distributed()
    micro_batch(args.batch_size, world_size, args.grad_accum)     # before anything is written
    out, lock = claim_output_dir(                                 # one run per directory
        args, "train_qa", [("--model", args.model), ("--train-file", args.train_file)], is_master,
        world_size, check=(lambda out: check_same_options(
            read_run_options(os.path.join(out, "train_args.json")), resume_options(args)))
        if args.resume else None)
    with lock, StopSignals() as stop:       # Ctrl-C, SIGTERM, SIGUSR1: see rundir
        set_matmul_precision(args.precision, device)    # this stage's own, never inherited
        texts = [x for ex in examples for x in (ex["question"], ex["context"])]
        model, tokenizer = load_phase1_model(args, out, texts)
        check_max_length(args.max_length, model, tokenizer)
        check_space(args.output_dir, model, 3, is_master, world_size)    # weights, Adam x 2
        features = build_features(examples, tokenizer, args.max_length, args.stride,
                                  max_query_length=args.max_query_length, windows=args.windows)
        if is_master:
            print(f"{len(examples)} examples -> {len(features['input_ids'])} features; device "
                  f"{device} x {world_size}" + ("; resuming" if args.resume else ""), flush=True)
            if not args.resume:
                start_output_dir(out, args, model, tokenizer)
        barrier(world_size)
        run_state = Phase1Run(out, args.resume, args.save_steps, resume_options(args), resume_with,
                              stop)
        model = train(model, features, tokenizer.pad_token_id, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                      weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                      device=device, rank=rank, world_size=world_size, precision=args.precision,
                      batches=args.batches, softmax_support=args.softmax_support,
                      max_length=args.max_length, run=run_state, compile=args.compile)
        if is_master:
            with stop.deferred():           # a signal now lets the run complete (rundir)
                install_phase1_model(out, args, model, tokenizer)


def check_args(args):
    for name in ("epochs", "batch_size", "grad_accum", "max_length", "max_examples",
                 "max_query_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise InputError(f"--weight-decay must be 0 or a positive number, got {args.weight_decay}")
    if args.warmup_steps < 0:
        raise InputError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    check_seed(args.seed)
    if not 0 < args.stride < args.max_length:
        raise InputError("--stride must be between 0 and --max-length")
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    args.save_steps = parse_save_steps(str(args.save_steps))
    if args.train_file == SQUAD_TRAIN_FILE and not os.path.exists(SQUAD_TRAIN_FILE):
        raise InputError(f"{SQUAD_TRAIN_FILE}: not found; run `python data/download.py squad` first")


# options that must match for --resume (the rest, e.g. --save-steps, may change)
RESUME_KEYS = ("model", "train_file", "epochs", "lr", "batch_size", "grad_accum", "weight_decay",
               "warmup_steps", "seed", "max_examples", "max_length", "stride", "max_query_length",
               "precision", "windows", "softmax_support", "batches", "as_authors")


def resume_options(args):
    return {key: getattr(args, key) for key in RESUME_KEYS}


def load_phase1_model(args, out, texts):
    """The model phase 1 starts from, or on --resume the run's own config and tokenizer (weights:
    the checkpoint)."""
    if args.resume:
        return load_checkpoint_model(out)
    return load_model_and_tokenizer(args.model or MODEL, texts=texts, seed=args.seed)


def start_output_dir(out, args, model, tokenizer):
    """A new run's directory: a previous phase-1 run there (--overwrite) set aside until this one
    completes, then the run's options, config and tokenizer (what --resume rebuilds it from)."""
    if start_fresh(out, "train_qa"):
        print(f"--overwrite: the previous run in {args.output_dir} is kept aside as "
              f"{os.path.basename(aside_path(out))} until this one completes", flush=True)
    with quiet_transformers():
        make_checkpoint_dir(out, model.config, tokenizer)
    atomic_write_json(os.path.join(out, "train_args.json"), vars(args), indent=1)


def install_phase1_model(out, args, model, tokenizer):
    """The trained model's files into the output directory (config.json last), then the run it
    replaced and, with --keep-checkpoint none, the checkpoint go."""
    source = os.path.join(out, ".tmp-final")
    shutil.rmtree(source, ignore_errors=True)                  # ours: a crash's leftover
    save_model(model, tokenizer, source)
    install_model_files(source, out)
    print(f"saved {args.output_dir}", flush=True)
    finish_replacing(out, args.output_dir)
    if args.keep_checkpoint == "none":
        remove_checkpoint(out, "train_qa", args.output_dir)


def barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def finish():
    """Under torchrun: every rank leaves the process group together. A rank that left while the
    master still wrote the model could abort in gloo's teardown (SIGABRT, CI 2026-12-05)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main, resume_hint, MEMORY_HINT)
