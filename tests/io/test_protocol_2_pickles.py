"""Pickle protocol 2 in Python 3 spells `bytes` as latin-1 text (`_codecs.encode(text, 'latin1')`):
the unpickler reads the text (a str) and decodes it as it reads the pickle, so such an array's bytes
are held in memory (about the file's size: a format nobody converts at gigabyte size), decoded once.
Oracle: numpy's own unpickler."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from conversion.architecture import Architecture
from conversion.errors import UnreadableCheckpoint
from conversion.io.handles import InMemory
from conversion.io.safe_pickle import PAYLOAD_THRESHOLD
from conversion.read import open_source
from conversion.synthetic import random_state_dict

from ..support import read_as_convert_does

SD = random_state_dict(Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True), seed=5)


def _protocol_2_pickle(path, arrays) -> bytes:
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "x"}, f, protocol=2)
    return path.read_bytes()


def test_protocol_2_arrays_are_decoded_as_the_pickle_is_read(tmp_path):
    """Every array's text becomes its bytes as the pickle is read: each storage is in memory (long or
    short), and what it spells is what numpy's own unpickler reads."""
    arrays = {k: v.numpy() for k, v in SD.items()}
    path = tmp_path / "p2.pkl"
    _protocol_2_pickle(path, arrays)
    with open(path, "rb") as f:
        oracle = pickle.load(f)["model"]

    source = open_source(str(path))

    assert any(want.nbytes > PAYLOAD_THRESHOLD for want in oracle.values()), "a long array, which a payload would leave in the file"
    for name, want in oracle.items():
        location = source.storages[source.objects["model"][name].storage.key]
        assert isinstance(location, InMemory) and location.data == want.tobytes(), name
    whole = read_as_convert_does(str(path))["model"]
    assert all(np.array_equal(whole[k], v) and whole[k].dtype == v.dtype for k, v in oracle.items())


@pytest.mark.parametrize("change, says", [
    ("a-character-over-255", "is not latin-1 text"),
    ("one-character-too-many", "needs 16384 bytes, its data has 16385"),
])
def test_protocol_2_text_that_does_not_spell_the_arrays_bytes_is_refused_when_read(tmp_path, change, says):
    """The text is decoded as the pickle is read: opening the file (metadata, what inspect reads)
    refuses it already, naming the tensor and what is wrong, and converting it writes nothing."""
    from conversion import convert

    arrays = {k: v.numpy() for k, v in SD.items()}
    name = "stages.3.0.pwconv1.weight"
    arrays[name] = np.full(arrays[name].shape, 1.5, np.float32)  # 1.5f is 00 00 c0 3f: U+00C0 takes 2 bytes of UTF-8
    assert arrays[name].nbytes == 16384
    path = tmp_path / "p2.pkl"
    data = bytearray(_protocol_2_pickle(path, arrays))
    at = data.index("\x00\x00\u00c0?".encode("utf-8") * 8) + 2
    data[at:at + 2] = "\u0100".encode("utf-8") if change == "a-character-over-255" else b"ab"
    path.write_bytes(bytes(data))

    for read in (open_source, read_as_convert_does):
        with pytest.raises(UnreadableCheckpoint, match=f"p2.pkl: '{name}': .*{says}"):
            read(str(path))
    (tmp_path / "out").mkdir()
    for ext in (".pth", ".pkl"):
        with pytest.raises(UnreadableCheckpoint, match=f"p2.pkl: .*{says}"):
            convert(str(path), str(tmp_path / "out" / f"w{ext}"))
    assert list((tmp_path / "out").iterdir()) == []
