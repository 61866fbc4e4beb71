"""Issue 13: `python distill.py --ntl 5 --t 2 --map-k` fetches and builds what it needs (prepare.py).

The main command runs in a fresh directory (the scripts, data/download.py and the shipped XQuAD),
SQuAD- and MLQA-shaped data served from 127.0.0.1, the tiny model as phase 1's base (the test-only
--phase1-model); small options keep each run under a minute on a CPU."""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import common
import distill
import prepare
import train_qa
from test_all import LANGS7, _fixtures, _Server

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = ["--ntl", "1", "--t", "2", "--map-k", "--max-examples", "40", "--epochs", "1",
        "--phase1-model", "tiny"]
PHASE2 = os.path.join("runs", "distill-ntl1-t2-skd-map")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
           PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
BUILDING = "not found: building it first"


def _files():
    """test_all's SQuAD/MLQA fixtures; phase 1 trains on 24 real XQuAD-en questions."""
    files = _fixtures()
    en = common.load_squad_examples(os.path.join(HERE, "data", "xquad", "xquad.en.json"))[:24]
    files["train-v1.1.json"] = json.dumps(common.examples_to_squad(en)).encode()
    return files


class _HeldFiles(dict):
    """The server's files; a GET of a name in `held` waits until `release` is set."""

    def __init__(self, files, held):
        super().__init__(files)
        self.held, self.release = set(held), threading.Event()

    def __getitem__(self, name):
        if name in self.held:
            self.release.wait(timeout=600)      # a guard against a hung test, not a timing
        return super().__getitem__(name)


@pytest.fixture
def server():
    s = _Server(_files())
    yield s
    if isinstance(s.files, _HeldFiles):         # a held GET must not outlive the test
        s.files.release.set()
    s.close()


def _fresh(root):
    """A fresh clone's layout: the scripts, data/download.py and the shipped XQuAD (a link)."""
    fresh = root / "clone"
    (fresh / "data").mkdir(parents=True)
    for path in glob.glob(os.path.join(HERE, "*.py")):
        if not os.path.basename(path).startswith("test_"):
            shutil.copy(path, fresh)
    shutil.copy(os.path.join(HERE, "data", "download.py"), fresh / "data")
    os.symlink(os.path.join(HERE, "data", "xquad"), fresh / "data" / "xquad")
    return fresh


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, files in os.walk(root) for n in dirs + files)


def _distill(fresh, argv, log=None):
    """distill.py of the fresh directory, run there; with `log`, started in the background."""
    cmd = [sys.executable, str(fresh / "distill.py")] + argv
    if log is None:
        return subprocess.run(cmd, cwd=fresh, env=ENV, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=fresh, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


def _one_error_line(proc_or_err, *words):
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_prepare_main_command_on_a_fresh_machine(server, tmp_path, monkeypatch, capsys):
    fresh = _fresh(tmp_path)
    r = _distill(fresh, MAIN + ["--data-base-url", server.url])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(BUILDING) == 1 and "runs/mbert-qa-en: built" in r.stdout
    # data placed and verified (structure; the counts are checked for the official URLs only)
    assert common.load_squad_examples(str(fresh / "data/squad/train-v1.1.json")) == \
        common.load_squad_examples(os.path.join(HERE, "data/xquad/xquad.en.json"))[:24]
    assert len(common.load_squad_examples(str(fresh / "data/squad/dev-v1.1.json"))) == 2
    assert prepare.download.verify_mlqa(str(fresh / "data/mlqa/MLQA_V1"), check_counts=False) > 0
    assert sorted(server.requests) == ["MLQA_V1.zip", "dev-v1.1.json", "train-v1.1.json"]
    # phase 1 with train_qa.py's own defaults (its base model aside), then phase 2 from it
    phase1 = json.load(open(fresh / "runs/mbert-qa-en/train_args.json"))
    defaults = vars(train_qa.parse_args([]))
    assert {k: v for k, v in phase1.items() if k != "model"} == \
        {k: v for k, v in defaults.items() if k != "model"} and phase1["model"] == "tiny"
    assert json.load(open(fresh / PHASE2 / "args.json"))["model"] == "runs/mbert-qa-en"
    assert os.path.isfile(fresh / PHASE2 / "config.json")
    dev = distill.read_log(str(fresh / PHASE2 / "dev_metrics.jsonl"))   # MLQA dev used
    assert len(dev) == 1 and len(dev[0]["pairs"]) == len(LANGS7) ** 2
    left = _listing(fresh)
    assert "runs/mbert-qa-en.lock" not in left and not [p for p in left if ".tmp" in p]
    # a second run (another --t) reuses everything: nothing fetched, nothing said
    server.requests.clear()
    monkeypatch.chdir(fresh)
    capsys.readouterr()
    prepare.prepare_inputs(distill.parse_args(MAIN + ["--t", "1", "--data-base-url", server.url]))
    assert server.requests == [] and capsys.readouterr().out == ""
    assert _listing(fresh) == left


def test_prepare_offline_is_one_line_and_leaves_nothing(tmp_path):
    fresh = _fresh(tmp_path)
    with socket.socket() as s:                  # a port nobody listens on: the network is down
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    before = _listing(fresh)
    r = _distill(fresh, MAIN + ["--data-base-url", url])
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    _one_error_line(r, "SQuAD v1.1", "train-v1.1.json", "data/squad/",
                    "python data/download.py squad", "--model DIR")
    assert _listing(fresh) == before            # no data, no runs/, no lock


def test_prepare_two_runs_build_phase1_once(server, tmp_path):
    fresh = _fresh(tmp_path)
    server.files = _HeldFiles(server.files, ["train-v1.1.json"])
    logs = [tmp_path / "run1.log", tmp_path / "run2.log"]
    with open(logs[0], "w") as log1, open(logs[1], "w") as log2:
        runs = [_distill(fresh, MAIN + ["--t", t, "--data-base-url", server.url], log)
                for t, log in (("1", log1), ("2", log2))]
        # The first run to take the lock is held in its SQuAD download until the other is seen
        # waiting for the lock; a second request for the file (no lock) or an exit ends it too.
        while not (any("waiting for it" in p.read_text() for p in logs)
                   or server.requests.count("train-v1.1.json") > 1
                   or any(run.poll() is not None for run in runs)):
            time.sleep(0.2)
        server.files.release.set()
        codes = [run.wait(timeout=600) for run in runs]
    out = [p.read_text() for p in logs]
    assert codes == [0, 0], out
    assert sum(o.count(BUILDING) for o in out) == 1
    assert sum("waiting for it" in o for o in out) == 1
    assert sum("all built, going on" in o for o in out) == 1
    assert sorted(server.requests) == ["MLQA_V1.zip", "dev-v1.1.json", "train-v1.1.json"]
    for t in ("1", "2"):
        assert os.path.isfile(fresh / "runs" / f"distill-ntl1-t{t}-skd-map" / "config.json")
    assert not os.path.exists(fresh / "runs" / "mbert-qa-en.lock")


HOLD = """import sys, time, prepare
lock = prepare.BuildLock(sys.argv[1])
assert lock.try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_prepare_stale_lock_is_detected_and_taken_over(tmp_path, capsys):
    runs = tmp_path / "runs"
    path = str(runs / "mbert-qa-en.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], cwd=HERE, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = prepare.BuildLock(path)
        assert not lock.try_acquire()                       # a live holder blocks, and is named
        assert f"pid {holder.pid} on {socket.gethostname()}" in lock.holder
    finally:
        holder.kill()                                       # dies holding it: the file stays
        holder.wait()
    partial, other = runs / ".tmp-mbert-qa-enab_cd123", runs / ".tmp-mbert-qa-en-v2ab_cd123"
    partial.mkdir()
    other.mkdir()
    capsys.readouterr()
    assert os.path.exists(path) and lock.try_acquire()
    out = capsys.readouterr().out
    assert "left by a run that stopped before finishing" in out and f"pid {holder.pid}" in out
    assert not partial.exists() and other.exists()          # its partial phase 1 only
    assert f"pid {os.getpid()} " in open(path).read()
    lock.release()
    assert sorted(os.listdir(runs)) == [other.name]


def test_prepare_what_is_missing_and_no_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def missing(*extra):
        return prepare.missing(distill.parse_args(["--ntl", "1", *extra]))

    assert missing() == ["model", "mlqa"]
    assert missing("--resume") == ["mlqa"]
    assert missing("--mlqa-dir", str(tmp_path)) == ["model"]
    assert missing("--model", "tiny") == [] and missing("--model", str(tmp_path)) == []
    # an explicit model: nothing fetched (the URL is down) and nothing written
    prepare.prepare_inputs(distill.parse_args(["--model", "tiny", "--data-base-url", "http://127.0.0.1:9"]))
    # --no-prepare: today's one-line error when the phase-1 model is missing
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: distill.main(["--ntl", "1", "--t", "2", "--map-k", "--no-prepare"]))
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, "runs/mbert-qa-en", "--no-prepare", "--model DIR",
                    "python train_qa.py")
    assert os.listdir(tmp_path) == []


def test_prepare_torchrun_waits_for_a_killed_holder_then_builds_phase1_with_ddp(server, tmp_path):
    """Under torchrun, rank 0 waits for the lock while rank 1 waits with it (one broadcast per
    poll); the holder is killed (a stale lock), then phase 1 runs on both processes (DDP)."""
    fresh = _fresh(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(fresh / "runs" / "mbert-qa-en.lock")],
                              cwd=HERE, env=ENV, stdout=subprocess.PIPE, text=True)
    log_path = tmp_path / "ddp.log"
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(log_path, "w") as log:
            # --batch-size 8: 4 rows per process, one slice of train_qa.CPU_ROWS in distill's step
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   "2", str(fresh / "distill.py")] + MAIN + ["--batch-size", "8",
                                                             "--data-base-url", server.url]
            job = subprocess.Popen(cmd, cwd=fresh, env=ENV, stdout=log, stderr=subprocess.STDOUT)
            while "waiting for it" not in log_path.read_text() and job.poll() is None:
                time.sleep(0.2)
            holder.kill()
            job.wait(timeout=600)
    finally:
        holder.kill()
        holder.wait()
    out = log_path.read_text()
    assert job.returncode == 0, out[-3000:]
    assert out.count(f"pid {holder.pid} on") == 2       # named while waiting, then as stale
    assert "left by a run that stopped before finishing" in out
    assert out.count(BUILDING) == 1 and "24 examples -> 24 features; device cpu x 2" in out
    assert sorted(server.requests) == ["MLQA_V1.zip", "dev-v1.1.json", "train-v1.1.json"]
    assert os.path.isfile(fresh / PHASE2 / "config.json")
    assert not os.path.exists(fresh / "runs" / "mbert-qa-en.lock")
