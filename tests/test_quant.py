"""Our torch dequantizer against gguf's own reference implementation, per format."""
import gguf
import numpy as np
import pytest
import torch

from portinfer.backends import quant


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_dequantize_matches_gguf(fmt):
    w = torch.randn(13, 96) * 3
    qw = quant.quantize(w, fmt)
    expected = gguf.quants.dequantize(qw.blocks.numpy(), getattr(gguf.GGMLQuantizationType, fmt.upper()))
    np.testing.assert_array_equal(quant.dequantize(qw).numpy(), expected)
    # and it is a quantization of w: within half a quantization step per block
    step = (w.abs().amax() / (127 if fmt == "q8_0" else 7))
    assert float((quant.dequantize(qw) - w).abs().max()) <= float(step)
