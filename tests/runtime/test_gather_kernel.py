"""The permuted plans' CUDA gather kernel (runtime/gather_kernel.py), run by the Triton
interpreter on CPU tensors against ``index_select`` / ``gather``."""
import pytest
import torch

from spattn.runtime.gather_kernel import gather_rows

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("B,H,N,M,D,dtype", [
    (1, 2, 37, 37, 16, torch.float32),
    (2, 3, 50, 64, 24, torch.bfloat16),     # padding slots: more rows out than in
    (2, 1, 130, 130, 200, torch.float16),   # D past one block of columns
    (3, 2, 65, 65, None, torch.float32),    # the lse: [B, H, N]
], ids=["B1-H2-N37-D16-fp32", "B2-H3-N50-M64-D24-bf16", "B2-H1-N130-D200-fp16",
        "B3-H2-N65-lse-fp32"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["one-order", "per-batch"])
def test_gather_rows_equals_index_select(B, H, N, M, D, dtype, per_batch):
    shape = (B, H, N) if D is None else (B, H, N, D)
    t = torch.randn(shape).to(dtype)
    t = t.transpose(0, 1).contiguous().transpose(0, 1)      # strides of another layout
    if per_batch:
        index = torch.stack([torch.randint(0, N, (M,)) for _ in range(B)])
        at = index[:, None, :] if D is None else index[:, None, :, None]
        want = t.gather(2, at.expand(shape[:2] + (M,) + shape[3:]))
    else:
        index = torch.randint(0, N, (M,))
        want = t.index_select(2, index)
    got = gather_rows(t, index)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)
