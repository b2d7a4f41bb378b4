"""The screening history: what a row holds, search, CSV export, and surviving kill -9."""
import csv
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from edge_app.classifier import Classifier
from edge_app.errors import HistoryError
from edge_app.history import History, Screening, beside, export_csv, file_sha256, now
from edge_app.screening import screen

pytestmark = pytest.mark.device  # make test-device: no training beyond device_run


@pytest.fixture(scope="module")
def classifier(device_run):
    return Classifier(device_run / "tflite" / "int8.tflite", accelerator="cpu")


def test_screenings_and_errors_are_recorded_in_full(tmp_path, classifier, tiny_dataset):
    history = History(tmp_path / "h.sqlite3")
    good = sorted((tiny_dataset / "test" / "pneumonia").iterdir())[0]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    ok, failed = screen(classifier, history, good), screen(classifier, history, bad)

    row = history.get(ok.screening.id)
    assert row.image_path == str(good) and row.image_sha256 == file_sha256(good)
    assert row.model_sha256 == classifier.model_sha256 and row.backend == classifier.backend.name
    assert row.label == ok.prediction.label and row.decision == ok.prediction.decision
    assert row.warning == ok.prediction.warning
    assert row.probabilities == ok.prediction.probabilities
    assert row.threshold == classifier.card.abnormal_threshold and row.error_code is None
    row = history.get(failed.screening.id)
    assert failed.prediction is None and row.error_code == "not_an_image" and row.label is None
    assert row.image_sha256 == file_sha256(bad)

    with sqlite3.connect(history.path) as conn:  # what another reader sees
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert history._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(sqlite3.IntegrityError):  # a row is a result or an error, never neither
        history.add(Screening("2026-01-01T00:00:00", "x", None, "m", "b"))


def test_search_by_text_label_and_date_and_csv_export(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    probs = {"normal": 0.2, "pneumonia": 0.7, "covid": 0.1}
    history.add(Screening("2026-03-01T10:00:00.000+00:00", "/clinic/a.jpg", "aa11", "m", "cpu",
                          label="pneumonia", probabilities=probs, abnormal_probability=0.8,
                          decision="refer", threshold=0.5, latency_ms=12.0))
    history.add(Screening("2026-03-02T09:00:00.000+00:00", "/clinic/b.dcm", "bb22", "m", "cpu",
                          label="normal", probabilities={**probs, "normal": 0.9}, abnormal_probability=0.1,
                          decision="no_abnormality", threshold=0.5, latency_ms=11.0))
    history.add(Screening("2026-03-03T08:00:00.000+00:00", "/clinic/c.png", None, "m", "cpu",
                          error_code="truncated", error_message="the image file is truncated"))
    paths = lambda rows: [r.image_path for r in rows]
    assert paths(history.search()) == ["/clinic/c.png", "/clinic/b.dcm", "/clinic/a.jpg"]
    assert paths(history.search("b.dcm")) == ["/clinic/b.dcm"]
    assert paths(history.search("aa1")) == ["/clinic/a.jpg"]              # by image hash
    assert paths(history.search("truncated")) == ["/clinic/c.png"]        # by error code
    assert paths(history.search(label="normal")) == ["/clinic/b.dcm"]
    assert paths(history.search(since="2026-03-02", until="2026-03-02")) == ["/clinic/b.dcm"]
    assert paths(history.search("clinic", since="2026-03-02")) == ["/clinic/c.png", "/clinic/b.dcm"]

    out = export_csv(history.search(), tmp_path / "history.csv")
    rows = list(csv.DictReader(out.open()))
    assert [r["image_path"] for r in rows] == ["/clinic/c.png", "/clinic/b.dcm", "/clinic/a.jpg"]
    assert rows[2]["p_pneumonia"] == "0.7" and rows[2]["decision"] == "refer"
    assert rows[0]["error_code"] == "truncated" and rows[0]["p_normal"] == ""


def test_a_version_1_history_gains_the_warning_column_and_keeps_its_rows(tmp_path):
    """Schema 1 had no warning column: a clinic's existing history opens, old rows read no warning."""
    path = tmp_path / "h.sqlite3"
    History(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE screenings DROP COLUMN warning")
        conn.execute("INSERT INTO screenings (screened_at, image_path, model_sha256, backend, label, decision) "
                     "VALUES ('2026-03-01T10:00:00.000+00:00', '/clinic/old.jpg', 'm', 'cpu', 'normal', 'unreliable')")
        conn.execute("PRAGMA user_version=1")
    history = History(path)
    old = history.search()[0]
    assert (old.image_path, old.decision, old.warning) == ("/clinic/old.jpg", "unreliable", None)
    history.add(Screening(now(), "/clinic/new.png", "cc33", "m", "cpu", label="covid", decision="unreliable",
                          warning="low_detail", abnormal_probability=0.9))
    assert [s.image_path for s in history.search("low_detail")] == ["/clinic/new.png"]
    assert history._conn.execute("PRAGMA user_version").fetchone()[0] == 2
    rows = list(csv.DictReader(export_csv(history.search(), tmp_path / "h.csv").open()))
    assert [r["warning"] for r in rows] == ["low_detail", ""]


# A screening loop as the app runs it: it prints a screening's id only once `screen` returned,
# i.e. after the commit, which is when the app shows a result.
WORKER = """
import itertools, sys
from edge_app.classifier import Classifier
from edge_app.history import History
from edge_app.screening import screen
model, db, *images = sys.argv[1:]
classifier, history = Classifier(model, accelerator="cpu"), History(db)
for image in itertools.cycle(images):
    print("shown", screen(classifier, history, image).screening.id, flush=True)
"""


def test_history_survives_kill_9_at_random_moments(tmp_path, device_run, tiny_dataset):
    db = tmp_path / "history.sqlite3"
    bad = tmp_path / "cut.jpg"
    good = sorted((tiny_dataset / "test").rglob("*.jpg"))[:5]
    bad.write_bytes(good[0].read_bytes()[:500])
    args = [sys.executable, "-c", WORKER, device_run / "tflite" / "int8.tflite", db, *good, bad]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(5)
    shown: list[int] = []
    kills = 25
    for _ in range(kills):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        first = threading.Event()

        def read(stream=proc.stdout):
            for line in stream:
                if line.endswith("\n"):   # the kill can cut the last line short: not shown
                    shown.append(int(line.split()[1]))
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60), "the worker never screened an image"
        time.sleep(rng.uniform(0.0, 0.25))   # mid-loop: inference, hashing, insert or fsync
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0]: r for r in conn.execute("SELECT id, label, error_code, image_sha256 FROM screenings")}
    missing = sorted(set(shown) - set(stored))
    assert not missing, f"{len(missing)} screenings were shown but are not in the history: {missing[:10]}"
    assert len(shown) > kills * 5
    assert all((label is None) != (error is None) and sha for _, label, error, sha in stored.values())
    errors = [r for r in stored.values() if r[2] is not None]
    assert errors and all(r[2] == "truncated" for r in errors)
    print(f"{kills} kills, {len(shown)} screenings shown, {len(stored)} stored, integrity ok")


# -- a history that cannot record: typed errors, the file left as it was, a fresh one beside it --
def _row(i: int) -> Screening:
    return Screening(now(), f"/clinic/{i}.jpg", "ab" * 32, "cd" * 32, "litert-interpreter", label="normal",
                     probabilities={"normal": 0.9, "pneumonia": 0.06, "covid": 0.04}, abnormal_probability=0.1,
                     decision="no_abnormality", threshold=0.5, latency_ms=9.0)


def filled(path, rows: int = 300):
    """A real history at `path` with `rows` screenings."""
    history = History(path)
    for i in range(rows):
        history.add(_row(i))
    history.close()
    return path


def corrupt_middle_page(path) -> int:
    """Overwrites 300 bytes of the page in the middle of the file, as a bad sector would; returns
    the number of pages."""
    data = bytearray(path.read_bytes())
    pages = len(data) // 4096
    middle = (pages // 2) * 4096
    data[middle + 100: middle + 400] = random.Random(7).randbytes(300)
    path.write_bytes(bytes(data))
    return pages


def _refused(path, code: str):
    """History(path) fails with `code`, leaves the file's bytes as they were, and a fresh history
    beside it records."""
    before = file_sha256(path)
    with pytest.raises(HistoryError) as err:
        History(path)
    assert err.value.code == code and err.value.path == str(path)
    assert file_sha256(path) == before
    fresh = History(beside(path))
    assert fresh.path.parent == path.parent and fresh.path != path
    assert fresh.add(_row(0)).id == 1 and fresh.integrity() == "ok"
    return err.value


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "history.sqlite3"
    path.write_text("screenings were kept in a notebook\n" * 200)
    exc = _refused(path, "history_corrupt")
    assert "damaged" in exc.message and "start a new history" in exc.message


def test_a_page_corrupted_in_the_middle_is_refused_untouched(tmp_path):
    path = filled(tmp_path / "history.sqlite3")
    pages = corrupt_middle_page(path)
    exc = _refused(path, "history_corrupt")
    assert "integrity check" in exc.message and pages > 10


def test_a_full_disk_reports_the_real_cause_and_loses_nothing(tmp_path):
    history = History(tmp_path / "history.sqlite3")
    pages = history._conn.execute("PRAGMA page_count").fetchone()[0]
    history._conn.execute(f"PRAGMA max_page_count={pages + 3}")   # a disk with three pages left
    stored = []
    with pytest.raises(HistoryError) as err:
        for i in range(1000):
            stored.append(history.add(_row(i)).id)
    assert err.value.code == "history_disk_full"
    assert "storage is full" in err.value.message and "database or disk is full" in err.value.message
    assert "cannot rollback" not in str(err.value)
    assert len(stored) > 10 and [s.id for s in history.search(limit=None)] == stored[::-1]
    history._conn.execute(f"PRAGMA max_page_count={pages + 1000}")  # space freed: records again
    assert history.add(_row(-1)).id == stored[-1] + 1 and history.integrity() == "ok"


# As root (CI), file modes bind nobody: the child drops the capabilities that bypass them.
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
OPEN = """
import json, sys
from edge_app.errors import HistoryError
from edge_app.history import History
try:
    History(sys.argv[1])
    print(json.dumps({"opened": True}))
except HistoryError as exc:
    print(json.dumps(exc.as_dict()))
"""


def _open_unprivileged(path) -> dict:
    result = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", OPEN, str(path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_a_read_only_history_is_refused_untouched(tmp_path, read_only):
    folder = tmp_path / "data"
    path = filled(folder / "history.sqlite3", rows=20)
    before = file_sha256(path)
    target = path if read_only == "file" else folder
    mode = target.stat().st_mode
    target.chmod(0o444 if read_only == "file" else 0o555)
    try:
        seen = _open_unprivileged(path)
    finally:
        target.chmod(mode)
    assert seen.get("code") == "history_read_only", seen
    assert "cannot be written" in seen["message"]
    assert file_sha256(path) == before and History(path).search(limit=None)[0].image_path == "/clinic/19.jpg"
