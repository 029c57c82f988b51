"""Reading a torch archive's index without its tensors (inspect reads under 1 MiB of a 100 MB file;
the index's allowlist refuses anything but tensor data) and the handles a shape fix makes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conversion.architecture import Architecture
from conversion.inspection import inspect_checkpoint
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)


def test_inspect_reads_only_the_index(tmp_path):
    """A 100 MB file is inspected by reading well under 1 MiB of it."""
    arch = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=1000, classifier_norm=True)
    torch.save({"model": random_state_dict(arch)}, tmp_path / "tiny.pth")
    report = inspect_checkpoint(str(tmp_path / "tiny.pth"))
    assert report.file_bytes > 100e6 and report.bytes_read is not None and report.bytes_read < 1 << 20, report.bytes_read


def test_the_index_refuses_anything_but_tensor_data(tmp_path):
    """The streamed reader's allowlist: a global outside it is refused, naming the file."""
    from conversion.errors import UnsafeCheckpoint
    from conversion.io.torchzip import read_index

    torch.save({"model": random_state_dict(ARCH), "hook": print}, tmp_path / "x.pth")
    with pytest.raises(UnsafeCheckpoint, match=r"x\.pth: refusing to load: the file asks to build '(__builtin__|builtins).print'"):  # protocol 2 spells builtins the Python 2 way
        read_index(str(tmp_path / "x.pth"))


def test_a_shape_applied_to_a_handle_is_data_a_new_stride_or_a_recorded_reshape():
    """Contiguous views get the new shape and its C-order strides; a non-contiguous view keeps its
    strides and records the reshape (read later in C order); tensors and arrays are reshaped."""
    from conversion.io.handles import StorageRef, TensorRef, is_contiguous, numel, with_shape

    ref = TensorRef(StorageRef("0", "FloatStorage", 24), 0, (2, 3, 4), (12, 4, 1))
    assert with_shape(ref, (6, 4)) == TensorRef(ref.storage, 0, (6, 4), (4, 1))
    assert with_shape(ref, (1, 1, 1, 24)).stride == (24, 24, 24, 1)
    assert numel(ref) == 24 and ref.dtype == "float32" and is_contiguous(with_shape(ref, (24,)))
    assert not any(hasattr(ref, m) for m in ("reshape", "numel", "ndim", "is_contiguous"))
    transposed = TensorRef(ref.storage, 0, (4, 3, 2), (1, 4, 12))
    fixed = with_shape(transposed, (24,))
    assert fixed == TensorRef(ref.storage, 0, (24,), (1, 4, 12), strided_shape=(4, 3, 2)) and not is_contiguous(fixed)
    assert with_shape(fixed, (4, 6)) == TensorRef(ref.storage, 0, (4, 6), (1, 4, 12), strided_shape=(4, 3, 2))
    assert with_shape(fixed, (4, 3, 2)).shape == (4, 3, 2) and numel(fixed) == 24
    with pytest.raises(ValueError, match="24 elements"):
        with_shape(ref, (5, 5))
    assert with_shape(np.arange(6), (2, 3)).shape == (2, 3) and with_shape(torch.zeros(6), (3, 2)).shape == (3, 2)
