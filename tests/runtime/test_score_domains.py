"""Scores outside their domain: prelude macros with constant arguments they are not defined
for (located errors at compile time), float lists with too few entries for the call's
heads and table divisors of 0 (SpattnInputError at call time, with and without a plan), and
the documented float32 semantics of a score that overflows."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnInputError, SpattnValueError
from spattn.runtime.reference import pattern_reference

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("score,params,need", [
    ("softcap(0.0)", {}, r"softcap\(c\) needs c > 0.*got softcap\(0.0\)"),
    ("softcap(-1.0)", {}, r"softcap\(c\) needs c > 0.*got softcap\(-1.0\)"),
    ("softcap(c)", {"c": 0.0}, r"got softcap\(0.0\)"),
    ("s + softcap(c * 2.0 - 4.0)", {"c": 2.0}, r"got softcap\(0.0\)"),
    ("s + bias[h, t5_bucket(2, 128)]", {}, r"4 <= buckets <= 8193.*got t5_bucket\(2, 128\)"),
    ("s + bias[h, t5_bucket(32, 8)]", {}, r"max_distance > buckets // 4.*t5_bucket\(32, 8\)"),
    ("s + bias[t5_bucket_causal(1, 10)]", {}, r"2 <= buckets <= 4096.*t5_bucket_causal\(1, 10\)"),
    ("s + bias[h, t5_bucket(32.0, 128)]", {}, r"needs integers 4 <= buckets.*t5_bucket\(32.0, 128\)"),
], ids=["softcap-0", "softcap-negative", "softcap-param", "softcap-arithmetic",
        "t5-buckets", "t5-distance", "t5-causal-buckets", "t5-float-buckets"])
def test_prelude_arguments_out_of_domain_are_located(score, params, need):
    with pytest.raises(SpattnValueError, match=need) as e:
        spattn.compile("causal", score=score, **params)
    col = score.index("softcap" if "softcap" in score else "t5_bucket") + 1
    assert e.value.column == col and e.value.line is not None
    assert str(e.value).splitlines()[-1] == " " * (col - 1) + "    ^"


def test_program_param_out_of_domain_is_located_at_the_call():
    src = "param c = -3.0\npattern capped = causal score softcap(c)\n"
    with pytest.raises(SpattnValueError, match=r"got softcap\(-3.0\)") as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == (2, 31)


def test_in_domain_arguments_still_compile():
    for score in ["softcap(0.5)", "s + bias[h, t5_bucket(4, 2)]", "s + bias[t5_bucket_causal(2, 2)]",
                  "softcap(w[h])"]:
        spattn.compile("causal", score=score)


def _qkv(H=4, L=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, 16, generator=g).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_shorter_than_the_heads_is_an_input_error(backend):
    """``alibi(m[h])`` with 2 slopes for 4 heads: refused before any work, naming the list,
    its index's values and the call's head count; with a plan too."""
    p = spattn.compile("causal", score="alibi(m[h])", m=[0.5, 0.25], backend=backend)
    q, k, v = _qkv(H=4)
    msg = r"list \[0.5, 0.25\] has 2 entries, but its index h takes values 0..3.*H=4"
    with pytest.raises(SpattnInputError, match=msg):
        p(q, k, v)
    with pytest.raises(SpattnInputError, match=msg):
        p.plan(q, k, v)
    q2, k2, v2 = _qkv(H=2)
    o = p(q2, k2, v2)
    ro, _ = pattern_reference(p, q2.double(), k2.double(), v2.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_of_a_table_checks_its_values(backend):
    """``softcap(cap[h])``: a cap of 0 for some head is a SpattnInputError at the call (and
    at each planned call: the values are the call's); positive caps give the reference's
    output and gradients, the caps' included."""
    p = spattn.compile("causal & window(8)", score="softcap(cap[h])", backend=backend)
    q, k, v = _qkv(H=2, L=20, seed=1)
    with pytest.raises(SpattnInputError, match=r"divides by cap\[h\], which is 0.*softcap"):
        p(q, k, v, cap=torch.tensor([1.5, 0.0]))
    plan = p.plan(q, k, v, cap=torch.tensor([1.5, 2.0]))
    with pytest.raises(SpattnInputError, match=r"divides by cap\[h\]"):
        p(q, k, v, plan=plan, cap=torch.tensor([0.0, 2.0]))
    q, k, v = _qkv(H=2, L=20, seed=2, grad=True)
    cap = torch.tensor([1.5, 0.75], requires_grad=True)
    o = p(q, k, v, plan=plan, cap=cap)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(o, (q, k, v, cap), do)
    rl = [x.detach().double().requires_grad_() for x in (q, k, v, cap)]
    ro, _ = pattern_reference(p, *rl[:3], cap=rl[3])
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)
    for a, b in zip(got, torch.autograd.grad(ro, rl, do.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=2e-3)


@pytest.mark.parametrize("score", ["softcap([1.5, 0.0][h])", "s / [2.0, 0.0][h]"],
                         ids=["softcap", "divide"])
def test_list_divisor_zero_for_a_head_of_the_call(score):
    """A float list divisor is checked like a table's at the heads of the call: a 0 entry
    reached by a head is refused (it made the output NaN or the softcap 0), one that no
    head reaches is not, and that call matches the reference."""
    p = spattn.compile("causal & window(8)", score=score, backend="torch")
    q, k, v = _qkv(H=2, L=20, seed=5)
    with pytest.raises(SpattnInputError, match=r"divides by \[.*\]\[h\], which is 0"):
        p(q, k, v)
    with pytest.raises(SpattnInputError, match=r"which is 0"):
        p.plan(q, k, v)
    q, k, v = (t[:, :1] for t in (q, k, v))
    o = p(q, k, v)
    ro, _ = pattern_reference(p, *(t.double() for t in (q, k, v)))
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_overflow_is_the_users(backend):
    """The documented semantics (docs/language.md §13): the kernels compute scores in
    float32, so a score beyond float32's range (here 1e38 * (q - 10) for q >= 14) is +inf
    there and its row NaN, while the float64 reference stays finite; rows in range agree."""
    p = spattn.compile("causal", score="s + float(max(q - 10, 0)) * 1e38", backend=backend)
    q, k, v = _qkv(H=2, L=20, seed=4)
    o = p(q, k, v, q_offset=0)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), q_offset=0)
    assert torch.isfinite(ro).all()
    assert o[:, :, 14:].isnan().all()
    torch.testing.assert_close(o[:, :, :11].double(), ro[:, :, :11], atol=2e-4, rtol=1e-3)


def test_table_divisor_not_read_while_a_cuda_graph_is_captured(monkeypatch):
    """The divisor check reads the tables' values on the host: while a CUDA graph is being
    captured that read would end the capture with an error, so the check is left to the
    warm-up calls (tests/runtime/test_gpu.py captures such a step on the device)."""
    from spattn.runtime import scores
    p = spattn.compile("causal & window(8)", score="softcap(cap[h])", backend="torch")
    q, k, v = _qkv(H=2, L=20, seed=1)
    plan = p.plan(q, k, v, cap=torch.tensor([1.5, 2.0]))
    read = []
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self, _real=torch.Tensor.tolist: read.append(1) or _real(self))
    monkeypatch.setattr(scores, "_capturing", lambda device: True)
    p(q, k, v, plan=plan, cap=torch.tensor([0.0, 2.0]))
    assert not read


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_beyond_float32_precision_stay_normalised(backend):
    """A row whose scores are near 1e9 in magnitude: float32 holds neither the differences
    of ``s`` there (the documented precision, docs/language.md §13: every key weighs the
    same) nor the log of the row's sum beside its largest score, so ``exp(f - lse)`` would
    weigh every key 1 and the output be the sum of V. The rows stay weighted means (and on
    the torch backend their V gradient is the uniform row's); the other rows agree with
    float64."""
    p = spattn.compile("true", score="if q < 2 then s - 1e9 else s", backend=backend)
    q, k, v = _qkv(H=2, L=24, seed=6)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = p(*leaves)
    mean = v.mean(2, keepdim=True).expand(-1, -1, 2, -1)
    torch.testing.assert_close(o[:, :, :2].detach(), mean, atol=2e-4, rtol=1e-3)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double())
    torch.testing.assert_close(o[:, :, 2:].detach().double(), ro[:, :, 2:], atol=2e-4,
                               rtol=1e-3)
    if backend != "torch":
        return          # (the kernels' backward recomputes P from the lse: docs/language.md)
    do = torch.randn_like(o)
    do[:, :, 2:] = 0
    o.backward(do)
    torch.testing.assert_close(leaves[2].grad, do[:, :, :2].sum(2, keepdim=True)
                               .expand_as(v) / v.shape[2], atol=2e-4, rtol=1e-3)
