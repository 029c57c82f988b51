"""Pickle protocol 2 in Python 3 spells `bytes` as latin-1 text (`_codecs.encode(text, 'latin1')`):
read as handles, an array's text stays in the file (a `Latin1Text` storage), decoded and
length-checked only when its bytes are wanted.  Oracle: numpy's own unpickler."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from conversion.architecture import Architecture
from conversion.errors import UnreadableCheckpoint
from conversion.io.handles import InMemory
from conversion.io.safe_pickle import PAYLOAD_THRESHOLD
from conversion.read import load_checkpoint, open_pickled
from conversion.synthetic import random_state_dict

SD = random_state_dict(Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True), seed=5)


def _protocol_2_pickle(path, arrays) -> bytes:
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "x"}, f, protocol=2)
    return path.read_bytes()


def test_protocol_2_spells_bytes_as_text_and_its_arrays_stay_in_the_file(tmp_path):
    """Protocol 2 in Python 3 writes an array's bytes as `_codecs.encode(text, 'latin1')`: the text's
    run of the file is the handle's storage (Latin1Text), decoded only when the bytes are wanted;
    what it spells is what numpy's own unpickler reads."""
    from conversion.io.handles import Latin1Text
    from conversion.io.tensor_bytes import read_latin1_text

    arrays = {k: v.numpy() for k, v in SD.items()}
    path = tmp_path / "p2.pkl"
    _protocol_2_pickle(path, arrays)
    with open(path, "rb") as f:
        oracle = pickle.load(f)["model"]

    source = open_pickled(str(path))

    # The threshold is on the text's length: 1 to 2 bytes of UTF-8 for each byte it spells.
    long_ones = [name for name, want in oracle.items() if want.nbytes > PAYLOAD_THRESHOLD]
    short_ones = [name for name, want in oracle.items() if 2 * want.nbytes <= PAYLOAD_THRESHOLD]
    assert long_ones and short_ones and source.bytes_read < 64 * 1024
    with open(path, "rb") as f:
        for name, want in oracle.items():
            location = source.storages[source.objects["model"][name].storage.key]
            if name in long_ones or name in short_ones:
                assert isinstance(location, Latin1Text if name in long_ones else InMemory), name
            got = read_latin1_text(f.fileno(), location) if isinstance(location, Latin1Text) else location.data
            assert got == want.tobytes(), name
    whole = load_checkpoint(str(path))["model"]
    assert all(np.array_equal(whole[k], v) and whole[k].dtype == v.dtype for k, v in oracle.items())


@pytest.mark.parametrize("change, says", [
    ("a-character-over-255", "is not latin-1 text"),
    ("one-character-too-many", "spells"),
])
def test_protocol_2_text_that_does_not_spell_the_arrays_bytes_is_refused_when_read(tmp_path, change, says):
    """The text's exact length in characters is only known once decoded: reading its handles
    (metadata) takes it, converting it refuses it, naming what is wrong, and writes nothing."""
    from conversion import convert

    arrays = {k: v.numpy() for k, v in SD.items()}
    name = "stages.3.0.pwconv1.weight"
    arrays[name] = np.full(arrays[name].shape, 1.5, np.float32)  # 1.5f is 00 00 c0 3f: U+00C0 takes 2 bytes of UTF-8
    path = tmp_path / "p2.pkl"
    data = bytearray(_protocol_2_pickle(path, arrays))
    at = data.index("\x00\x00\u00c0?".encode("utf-8") * 8) + 2
    data[at:at + 2] = "\u0100".encode("utf-8") if change == "a-character-over-255" else b"ab"
    path.write_bytes(bytes(data))

    assert open_pickled(str(path)).objects["model"][name].shape == arrays[name].shape
    with pytest.raises(UnreadableCheckpoint, match=says):
        load_checkpoint(str(path))
    (tmp_path / "out").mkdir()
    for ext in (".pth", ".pkl"):
        with pytest.raises(UnreadableCheckpoint, match=f"p2.pkl: .*{says}"):
            convert(str(path), str(tmp_path / "out" / f"w{ext}"))
    assert list((tmp_path / "out").iterdir()) == []
