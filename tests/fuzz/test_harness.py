"""The fuzz harness itself (tests/fuzz/harness.py): a bounded `--runs` smoke run keeps every promise,
its oracle does report a broken one, and its mutators keep the structure they promise to keep.

The harness's long runs (`tox -e fuzz`, atheris) are not part of the suite; this runs its seeds and
a few dozen structure-aware mutations of them without atheris, in a few seconds.
"""
from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import pytest

from conversion.errors import UnreadableCheckpoint
from conversion.testing.loading import TORCH_HAS_WEIGHTS_ONLY

from . import harness, mutators, oracle, seeds

SMOKE_RUNS = 40
SEED_SHARE = 6  # one seed in six: every format, each command, a few seconds
MUTATIONS_CHECKED = 30


@pytest.fixture(scope="module")
def seed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    seeds.write_seeds(folder)
    for i, path in enumerate(sorted(folder.iterdir())):
        if i % SEED_SHARE:
            path.unlink()
    return folder


def test_a_bounded_run_of_the_harness_keeps_every_promise(seed_folder, tmp_path, capsys):
    import warnings

    findings = tmp_path / "findings"
    with warnings.catch_warnings():  # the harness silences the libraries' warnings about mutated files
        status = harness.main(["--runs", str(SMOKE_RUNS), "--corpus", str(seed_folder), "--findings", str(findings)])
    out = capsys.readouterr().out
    assert status == 0, out + "".join(p.read_text() for p in findings.glob("*.txt"))
    assert f"{SMOKE_RUNS + len(list(seed_folder.iterdir()))} runs, 0 finding(s)" in out
    assert not findings.exists()


def _seed(name_part: str, command: int) -> bytes:
    name, data = next((n, d) for n, d in seeds.seed_files() if name_part in n)
    return bytes([oracle.selector_for(command, "." + name.rsplit(".", 1)[1])]) + data


def test_the_oracle_reports_an_internal_error_and_a_file_left_behind(tmp_path, monkeypatch):
    def fails_after_writing(src, dst, **kwargs):
        Path(dst).write_bytes(b"half")
        raise UnreadableCheckpoint("refused after writing.")

    data = _seed("tiny.zip", command=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setattr("conversion.cli.convert", lambda *a, **k: 1 / 0)
    assert any("internal error: ZeroDivisionError" in p for p in oracle.broken_promises(data, tmp_path / "a"))
    monkeypatch.setattr("conversion.cli.convert", fails_after_writing)
    assert any("left behind after exit 2" in p for p in oracle.broken_promises(data, tmp_path / "b"))


def test_the_zip_mutator_keeps_every_member_crc_right():
    data = _seed("tiny.zip", command=1)
    rng = random.Random(0)
    kept = 0
    for _ in range(MUTATIONS_CHECKED):
        body = mutators.mutate_zip(data[1:], rng, lambda b, n: b[: max(1, len(b) - 1)])
        try:
            with zipfile.ZipFile(io.BytesIO(body)) as archive:
                kept += archive.testzip() is None
        except Exception:  # noqa: BLE001 - a local header's flags or sizes were the target
            pass
    assert kept >= MUTATIONS_CHECKED // 2


def test_the_pickle_mutator_changes_opcodes_not_bytes_at_random():
    import pickletools

    data = _seed("tiny.numpy-p4", command=0)[1:]
    rng = random.Random(1)
    parsed = 0
    for _ in range(MUTATIONS_CHECKED):
        body = mutators.mutate_pickles(data, rng, lambda b, n: b)
        try:
            list(pickletools.genops(io.BytesIO(body)))
            parsed += 1
        except Exception:  # noqa: BLE001 - an opcode moved where its argument no longer parses
            pass
    assert parsed >= MUTATIONS_CHECKED // 2


# The independent decoder reads torch files with weights_only (torch >= 1.13); numpy pickles everywhere.
NEEDS_WEIGHTS_ONLY = pytest.mark.skipif(not TORCH_HAS_WEIGHTS_ONLY, reason="torch < 1.13 has no weights_only reader to compare with")


@pytest.mark.parametrize("seed_name, command", [
    pytest.param("tiny.zip", 1, marks=NEEDS_WEIGHTS_ONLY), ("tiny.numpy-p2", 2), pytest.param("half.legacy", 1, marks=NEEDS_WEIGHTS_ONLY),
])
def test_the_differential_check_catches_a_tensor_that_differs_from_what_torch_or_numpy_read(seed_name, command, tmp_path, monkeypatch):
    data = _seed(seed_name, command)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert oracle.broken_promises(data, tmp_path / "a") == []
    read_written = oracle._read_written

    def one_value_changed(dst):
        written = dict(read_written(dst))
        name = sorted(written)[0]
        written[name] = written[name] + 1
        return written

    monkeypatch.setattr(oracle, "_read_written", one_value_changed)
    assert any("hold no tensor the source decodes to" in p for p in oracle.broken_promises(data, tmp_path / "b"))


def test_the_reference_decoder_runs_out_of_its_headroom_not_of_the_machine(tmp_path):
    """A fuzz finding (the corpus's fuzz-reference-decoder-out-of-memory): an 8 KB pickle on which
    Python's own unpickler, the oracle's reference, allocates 4.7 GB.  The reference gives up within
    its headroom, and the run keeps every promise (convnext-d2 converts it at tens of MB)."""
    from tests.adversarial.judge import decode_independently

    data = (Path(__file__).resolve().parents[1] / "adversarial" / "corpus" / "fuzz-reference-decoder-out-of-memory.bin").read_bytes()
    (tmp_path / "decode").mkdir()
    (tmp_path / "run").mkdir()
    assert oracle.broken_promises(data, tmp_path / "run", rss_limit=oracle.peak_rss_bytes() + 2 * 2**30) == []
    _, src, _, _ = oracle.lay_out(data, tmp_path / "decode")
    with pytest.raises(MemoryError):
        decode_independently(src, headroom=256 * 2**20)
