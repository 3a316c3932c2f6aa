"""One tolerance table for comparing a compiled path with its dense-with-zeros oracle."""

import torch

# dtype -> (rtol, atol), with the reason for each entry.
TOLERANCES = {
    # fp32: same math, different summation order (Inductor fusion, blocked reductions);
    # rtol 1e-5 is the bar, atol 1e-5 covers sums that cancel to ~0.
    torch.float32: (1e-5, 1e-5),
    # bf16: 8 mantissa bits; one rounding of each fp32-accumulated output.
    torch.bfloat16: (1.6e-2, 1e-2),
    # fp16: 11 mantissa bits.
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, msg=""):
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")

# Per-block saliency sums (fp32): each is a sum of b*b products accumulated in a different
# order by each path (blocked kernel reduction vs torch.sum), so relative error grows with b.
SCORE_TOLERANCE = (1e-4, 1e-4)
