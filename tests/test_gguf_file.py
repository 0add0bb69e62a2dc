"""portinfer's GGUF reader against the gguf package's own reader (the independent reference):
identical metadata and identical bytes for every tensor, on the real SmolLM2 file."""
import numpy as np
import pytest

from portinfer.runtime import default_model_path
from portinfer.runtime.gguf_file import GGUFFile, GGUFFormatError


def test_reader_matches_gguf_package():
    import gguf

    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(f"needs the SmolLM2 GGUF: {exc}")
    ref = gguf.GGUFReader(str(path))
    ours = GGUFFile(path)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ref.tensors, ours.tensors):
        assert b.shape == tuple(int(d) for d in reversed(a.shape.tolist())), a.name
        assert b.type == int(a.tensor_type), a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8).reshape(-1), b.data), a.name
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(ours.metadata)
    for k in keys:
        expected = ref.fields[k].contents()
        assert ours.metadata[k] == expected or np.allclose(ours.metadata[k], expected), k


@pytest.mark.parametrize("data, match", [
    (b"GGUF\x03\x00\x00\x00\x00", r"past the end of the file"),
    (b"GGML" + bytes(40), r"bad magic"),
    (b"GGUF\x09\x00\x00\x00" + bytes(16), r"version 9 is not supported"),
])
def test_malformed_headers_are_named(tmp_path, data, match):
    (tmp_path / "x.gguf").write_bytes(data)
    with pytest.raises(GGUFFormatError, match=match):
        GGUFFile(tmp_path / "x.gguf")
