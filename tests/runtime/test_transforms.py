"""Calls under torch.func transforms (runtime/transforms.py): vmap folds the mapped dimension
into B (or calls once per sample where the pattern reads b itself), grad / vjp / jacrev
take the reverse-mode derivative, and what spattn cannot do there is a SpattnError.

Every result is checked against the float64 reference (``pattern_reference``) of each
sample on its own: outputs, lse, and per-sample gradients of q, k, v and the score's
tables, on fresh random inputs."""
import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vjp, vmap

import spattn
from spattn.dsl.errors import SpattnBackendError, SpattnInputError, SpattnParamError
from spattn.runtime import transforms
from spattn.runtime.reference import pattern_reference

interpreter = pytest.mark.interpreter


def _rand(g, *shape):
    return torch.randn(*shape, generator=g)


def _close(got, want, tol=2e-4):
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def _sample_ref(pat, q, k, v, do, want=(), **inputs):
    """Float64 ``(o, lse, grads)`` of one sample: grads of ``(o * do).sum()`` with respect
    to q, k, v and the tables named in ``want``."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ins = {n: (t.detach().double().requires_grad_() if n in want else t)
           for n, t in inputs.items()}
    o, lse = pattern_reference(pat, *leaves, **ins)
    gs = torch.autograd.grad((o * do.double()).sum(), leaves + [ins[n] for n in want])
    return o, lse, gs


# ------------------------------------------------------------------ vmap: the forward

CASES = [
    # id, mask, score, per-sample inputs (name -> (shape, kind)), mapped inputs
    ("mask", "causal & (window(7) | sink(2))", None, {}, ()),
    ("doc-shared", "causal & same(doc)", None, {"doc": ((30,), "doc")}, ()),
    ("doc-mapped", "causal & same(doc)", None, {"doc": ((30,), "doc")}, ("doc",)),
    ("doc-b-mapped", "causal & doc[b, q] == doc[b, k]", None, {"doc": ((2, 30), "doc")},
     ("doc",)),
    ("doc-b-shared", "causal & doc[b, q] == doc[b, k]", None, {"doc": ((2, 30), "doc")}, ()),
    ("first-lead", "causal & k >= first[h]", None, {"first": ((2, 2), "first")}, ("first",)),
    ("reads-b", "causal & (q + b) % 3 != 0", None, {}, ()),
    ("table-h", "causal", "s + rel[h, q - k + 29]", {"rel": ((2, 59), "table")}, ()),
    ("table-mapped", "causal", "s + rel[h, q - k + 29]", {"rel": ((2, 59), "table")}, ("rel",)),
    ("table-lead1", "causal", "s + rel[h, q - k + 29]", {"rel": ((1, 2, 59), "table")}, ()),
    ("table-leadB", "causal", "s + rel[h, q - k + 29]", {"rel": ((2, 2, 59), "table")}, ()),
    ("table-at-b", "window(9)", "s * bias[b, h]", {"bias": ((5, 2), "table")}, ()),
    ("softcap", "causal", "20 * tanh(s / 20)", {}, ()),
]


def _inputs(g, spec, N):
    """Per-sample inputs ``[N, *shape]`` for each name of ``spec``."""
    out = {}
    for name, (shape, kind) in spec.items():
        if kind == "doc":
            out[name] = torch.randint(0, 3, (N, *shape), generator=g).sort(-1).values
        elif kind == "first":
            out[name] = torch.randint(0, 12, (N, *shape), generator=g)
        else:
            out[name] = _rand(g, N, *shape)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_vmap_grad_matches_each_sample(case):
    """``vmap(grad(f))``: per-sample outputs, lse and gradients of q, k, v and every float
    table equal each sample's float64 reference; a shared input is the same for every
    sample, a mapped one each sample's own."""
    _, mask, score, spec, mapped = case
    pat = spattn.compile(mask, score=score, backend="torch")
    g = torch.Generator().manual_seed(11)
    N, B, H, L, D = 3, 2, 2, 30, 16
    q, k, v = (_rand(g, N, B, H, L, D) for _ in range(3))
    do = _rand(g, N, B, H, L, D)
    ins = _inputs(g, spec, N)
    tables = sorted(n for n, (_, kind) in spec.items() if kind == "table")
    names = sorted(ins)

    def f(q, k, v, do, *xs):
        o, lse = pat(q, k, v, return_lse=True, **dict(zip(names, xs)))
        return (o * do).sum(), (o, lse)

    argnums = (0, 1, 2) + tuple(4 + names.index(n) for n in tables)
    in_dims = (0, 0, 0, 0) + tuple(0 if n in mapped else None for n in names)
    xs = [ins[n] if n in mapped else ins[n][0] for n in names]
    grads, (o, lse) = vmap(grad(f, argnums=argnums, has_aux=True), in_dims=in_dims)(
        q, k, v, do, *xs)
    for i in range(N):
        per = {n: (ins[n][i] if n in mapped else ins[n][0]) for n in names}
        ro, rl, rg = _sample_ref(pat, q[i], k[i], v[i], do[i], want=tables, **per)
        _close(o[i], ro)
        _close(torch.where(torch.isfinite(lse[i]), lse[i], 0),
               torch.where(torch.isfinite(rl), rl, 0))
        for got, want in zip(grads, rg):
            _close(got[i], want, tol=5e-4)


@pytest.mark.parametrize("src,shape", [("k >= doc[b, h] - 20", (1, 2)),
                                       ("k >= doc[h] - 20", (1, 2))],
                         ids=["index-at-b", "leading-1"])
def test_a_size_one_batch_axis_of_a_single_element_batch(src, shape):
    """B = 1: an input read at b has one row, which the folded call of N elements needs N
    times (a leading ``[1]`` broadcasts as it is)."""
    pat = spattn.compile(src, backend="torch")
    g = torch.Generator().manual_seed(13)
    q, k, v = (_rand(g, 3, 1, 2, 10, 16) for _ in range(3))
    doc = torch.randint(0, 30, shape, generator=g)
    o = vmap(lambda a, b, c: pat(a, b, c, doc=doc))(q, k, v)
    for i in range(3):
        _close(o[i], pattern_reference(pat, q[i].double(), k[i].double(), v[i].double(),
                                       doc=doc)[0])


def test_patterns_equal_but_for_their_declared_inputs():
    """``false & same(doc)`` and ``false`` are one IR under one key: each call is checked
    against its own pattern's inputs, not the first one registered under that key."""
    q = torch.randn(2, 1, 1, 8, 16)
    doc = torch.zeros(8, dtype=torch.long)
    for first, second, kw in (("false", "false & same(doc)", {"doc": doc}),
                              ("same(doc) & false", "false & true", {})):
        a, b = (spattn.compile(s, backend="torch") for s in (first, second))
        a(q[0], q[0], q[0], **({} if kw else {"doc": doc}))
        o = vmap(lambda t: b(t, t, t, **kw))(q)
        assert torch.equal(o, torch.zeros_like(o))


def test_the_fold_is_the_path_where_b_is_only_an_index():
    """The vmap rule folds into B exactly where the pattern reads b only as a bare index
    (a call of N * B batch elements computes each sample's mask and score), and calls
    once per sample where it reads b otherwise."""
    assert transforms.batch_axes(spattn.compile("causal & same(doc)")) == {"doc": None}
    assert transforms.batch_axes(spattn.compile("doc[b, q] == doc[b, k]")) == {"doc": 0}
    assert transforms.batch_axes(spattn.compile("k >= first[b]")) == {"first": 0}
    assert transforms.batch_axes(spattn.compile("causal", score="s + t[h, b]")) == {"t": 1}
    for src in ("causal & (q + b) % 3 != 0", "k >= first[b + 0 * q] | b > 0",
                "x[b, b] > 0"):
        assert transforms.batch_axes(spattn.compile(src)) is None, src


@pytest.mark.parametrize("in_dims,shared", [((1, 1, 1), ""), ((0, None, None), "kv"),
                                             ((None, 2, 2), "q")],
                         ids=["dim1", "q-only", "kv-only-dim2"])
def test_vmap_in_dims_gqa_offset_layout(in_dims, shared):
    """Mapped dims other than 0, unmapped q or k and v, grouped heads, a query offset, a
    scale and the [B, L, H, D] layout all keep their meaning under vmap."""
    pat = spattn.compile("causal & window(6)", backend="torch")
    g = torch.Generator().manual_seed(5)
    N, B, Hq, Hk, Lq, Lk, D = 3, 2, 4, 2, 9, 20, 16
    q, k, v = _rand(g, B, Lq, Hq, D), _rand(g, B, Lk, Hk, D), _rand(g, B, Lk, Hk, D)
    xs = []
    for t, d, name in zip((q, k, v), in_dims, "qkv"):
        xs.append(t if d is None else torch.stack([_rand(g, *t.shape) for _ in range(N)], d))
    o = vmap(lambda a, b, c: pat(a, b, c, layout="bshd", q_offset=8, scale=0.3),
             in_dims=in_dims)(*xs)
    assert o.shape == (N, B, Lq, Hq, D)
    for i in range(N):
        a, b, c = (x if d is None else x.select(d, i) for x, d in zip(xs, in_dims))
        ro, _ = pattern_reference(pat, *(t.transpose(1, 2).double() for t in (a, b, c)),
                                  q_offset=8, scale=0.3)
        _close(o[i], ro.transpose(1, 2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_a_grid_pattern_under_vmap_grad(backend):
    """A 2-D neighbourhood (which runs in its token layout) under vmap of grad."""
    pat = spattn.neighborhood((6, 8), 3, stride=(1, 2), backend=backend)
    g = torch.Generator().manual_seed(14)
    q, k, v, do = (_rand(g, 2, 1, 2, 48, 16) for _ in range(4))
    o = vmap(pat)(q, k, v)
    gs = vmap(grad(lambda a, b, c, d: (pat(a, b, c) * d).sum(), argnums=(0, 1, 2)))(q, k, v, do)
    for i in range(2):
        ro, _, rg = _sample_ref(pat, q[i], k[i], v[i], do[i])
        _close(o[i], ro)
        for got, want in zip(gs, rg):
            _close(got[i], want, tol=5e-4)


def test_nested_vmap_and_chunks():
    """vmap of vmap folds twice; ``chunk_size`` runs the rule per chunk."""
    pat = spattn.compile("causal & same(doc)", backend="torch")
    g = torch.Generator().manual_seed(2)
    q, k, v = (_rand(g, 2, 3, 1, 2, 24, 16) for _ in range(3))
    doc = torch.randint(0, 2, (2, 3, 24), generator=g).sort(-1).values
    o = vmap(vmap(lambda a, b, c, d: pat(a, b, c, doc=d)))(q, k, v, doc)
    o2 = vmap(lambda a, b, c, d: pat(a.flatten(0, 1), b.flatten(0, 1), c.flatten(0, 1),
                                     doc=d[0]), chunk_size=1)(q, k, v, doc)
    for i in range(2):
        for j in range(3):
            ro, _ = pattern_reference(pat, q[i, j].double(), k[i, j].double(),
                                      v[i, j].double(), doc=doc[i, j])
            _close(o[i, j], ro)
        ro, _ = pattern_reference(pat, q[i].flatten(0, 1).double(),
                                  k[i].flatten(0, 1).double(), v[i].flatten(0, 1).double(),
                                  doc=doc[i, 0])
        _close(o2[i], ro)


@pytest.mark.parametrize("score", [None, "s - 0.1 * abs(q - k)"], ids=["mask", "score"])
def test_few_queries_many_keys_after_warm_fast_entries(score):
    """A decode-shaped call (one query, many keys) under vmap, after plain calls of that
    shape left fast entries in their plans: the transform's call takes its own path."""
    pat = spattn.compile("causal & window(50)", score=score, backend="torch")
    g = torch.Generator().manual_seed(12)
    kc, vc = _rand(g, 1, 2, 300, 16), _rand(g, 1, 2, 300, 16)
    for _ in range(3):
        assert torch.isfinite(pat(_rand(g, 1, 2, 1, 16), kc, vc)).all()
    qs = _rand(g, 4, 1, 2, 1, 16)
    o = vmap(lambda a: pat(a, kc, vc))(qs)
    gq = vmap(grad(lambda a: pat(a, kc, vc).square().sum()))(qs)
    for i in range(4):
        ro, _, (rq, _, _) = _sample_ref(pat, qs[i], kc, vc, 2 * pat(qs[i], kc, vc))
        _close(o[i], ro)
        _close(gq[i], rq)


# ------------------------------------------------------------------ grad, vjp, jacrev

def test_grad_vjp_and_jacrev_match_float64():
    pat = spattn.compile("causal & same(doc)", score="s + rel[h, q - k + 5]",
                         backend="torch")
    g = torch.Generator().manual_seed(8)
    q, k, v = (_rand(g, 1, 2, 6, 16) for _ in range(3))
    doc = torch.tensor([0, 0, 1, 1, 1, 2])
    rel = _rand(g, 2, 11)
    do = _rand(g, 1, 2, 6, 16)
    f = lambda a, r: pat(a, k, v, doc=doc, rel=r)            # noqa: E731
    o, back = vjp(f, q, rel)
    gq, gr = back(do)
    ro, _, (rq, _, _, rr) = _sample_ref(pat, q, k, v, do, want=("rel",), doc=doc, rel=rel)
    _close(o, ro)
    _close(gq, rq)
    _close(gr, rr)
    gq2 = grad(lambda a: (f(a, rel) * do).sum())(q)
    _close(gq2, rq)
    J = jacrev(lambda a: f(a, rel))(q)
    Jr = torch.autograd.functional.jacobian(
        lambda a: pattern_reference(pat, a, k.double(), v.double(), doc=doc,
                                    rel=rel.double())[0], q.double())
    _close(J, Jr)


class _Attn(torch.nn.Module):
    def __init__(self, pat, D=32, H=2):
        super().__init__()
        self.pat, self.H = pat, H
        self.qkv = torch.nn.Linear(D, 3 * D)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.H, D // self.H).unbind(2)
        return self.pat(q, k, v, layout="bshd").reshape(B, L, D)


def test_an_ensemble_and_per_sample_gradients_through_functional_call():
    """The torch.func recipes: an ensemble of models run by vmap over stacked parameters,
    and per-sample gradients of a model's parameters (vmap of grad over the batch), equal
    to each model and each sample run on its own with torch.autograd."""
    pat = spattn.compile("causal & window(5)", backend="torch")
    torch.manual_seed(0)
    models = [_Attn(pat) for _ in range(3)]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    x = torch.randn(2, 12, 32)
    out = vmap(lambda p: functional_call(models[0], p, (x,)))(params)
    for i, m in enumerate(models):
        _close(out[i], m(x).double().detach(), tol=1e-5)
    m = models[1]
    p = {n: t.detach() for n, t in m.named_parameters()}

    def loss(p, xi):
        return functional_call(m, p, (xi[None],)).square().sum()

    per = vmap(grad(loss), in_dims=(None, 0))(p, x)
    for i in range(2):
        m.zero_grad()
        m(x[i:i + 1]).square().sum().backward()
        for n, t in m.named_parameters():
            _close(per[n][i], t.grad.double(), tol=1e-4)


# ------------------------------------------------------------------ what is refused

def test_second_and_forward_mode_derivatives_are_spattn_errors():
    pat = spattn.compile("causal", backend="torch")
    g = torch.Generator().manual_seed(4)
    q, k, v = (_rand(g, 1, 1, 4, 16) for _ in range(3))
    f = lambda a: pat(a, k, v)                                # noqa: E731
    for run in (lambda: hessian(lambda a: f(a).sum())(q), lambda: jacfwd(f)(q),
                lambda: torch.func.jvp(f, (q,), (torch.ones_like(q),))):
        with pytest.raises(SpattnBackendError, match="no forward-mode derivative"):
            run()
    # dual tensors of torch.autograd.forward_ad (what linearize passes), with and without a
    # score, requiring grad or not
    import torch.autograd.forward_ad as fwad
    scored = spattn.compile("causal", score="softcap(5.0)", backend="torch")
    for p in (pat, scored):
        for a in (q, q.clone().requires_grad_()):
            with pytest.raises(SpattnBackendError, match="no forward-mode derivative"):
                with fwad.dual_level():
                    p(fwad.make_dual(a, torch.ones_like(a)), k, v)
        with pytest.raises(SpattnBackendError, match="no forward-mode derivative"):
            torch.func.linearize(lambda a: p(a, k, v), q)
    with pytest.raises(SpattnBackendError, match="differentiable once"):
        grad(lambda a: grad(lambda b: f(b).square().sum())(a).sum())(q)
    with pytest.raises(SpattnBackendError, match="differentiable once"):
        vmap(grad(lambda a: grad(lambda b: f(b).square().sum())(a).sum()))(q[None])


def test_a_mapped_scale_is_a_value_error_and_a_score_does_it():
    """A scale mapped by vmap cannot be read as a number: a SpattnValueError that points at
    a score with a per-batch temperature, which maps and takes its gradients."""
    from spattn.dsl.errors import SpattnValueError
    pat = spattn.compile("causal", backend="torch")
    q = torch.randn(3, 1, 1, 8, 16)
    with pytest.raises(SpattnValueError, match="scale is a tensor of a torch.func transform"):
        vmap(lambda a, s: pat(a, a, a, scale=s))(q, torch.rand(3))
    temp = spattn.compile("causal", score="s * temp[b]", backend="torch")
    t = torch.rand(3, 1) + 0.5
    o = vmap(lambda a, s: temp(a, a, a, temp=s))(q, t)
    for i in range(3):
        _close(o[i], pattern_reference(pat, *(q[i].double(),) * 3,
                                       scale=float(t[i, 0]) / 4)[0])


def test_plan_order_and_bad_shapes_under_a_transform():
    pat = spattn.compile("causal & window(5)", backend="torch")
    g = torch.Generator().manual_seed(6)
    q, k, v = (_rand(g, 3, 1, 2, 20, 16) for _ in range(3))
    plan = pat.plan(q[0], k[0], v[0])
    with pytest.raises(SpattnParamError, match="plan= was given with tensors of a torch.func"):
        vmap(lambda a: pat(a, k[0], v[0], plan=plan))(q)
    with pytest.raises(SpattnParamError, match="order= is not available under torch.func"):
        vmap(lambda a: pat(a, k[0], v[0], order=torch.arange(20)))(q)
    # the message shows the shapes as written under the transform, not the folded ones
    with pytest.raises(SpattnInputError, match=r"k has batch size 2 \(shape \(2, 2, 20, 16\)\)"):
        vmap(lambda a, b: pat(a, b, b))(q, torch.randn(3, 2, 2, 20, 16))
    # an index bound is checked on the folded call, and the message says so
    with pytest.raises(SpattnInputError, match=r"'doc' \(shape \(3, 7\)\) is too short.*"
                                               r"under vmap: the shapes of the call with"):
        vmap(lambda a, d: spattn.compile("same(doc)", backend="torch")(a, a, a, doc=d))(
            q, torch.zeros(3, 7, dtype=torch.long))


@interpreter
def test_triton_backend_under_vmap_grad():
    """The Triton kernels (the interpreter here) behind the same rules: a folded call of a
    document mask with a learned table, per-sample gradients."""
    pat = spattn.compile("causal & same(doc)", score="s + rel[h, q - k + 39]",
                         backend="triton")
    g = torch.Generator().manual_seed(9)
    N, B, H, L, D = 2, 1, 2, 40, 16
    q, k, v, do = (_rand(g, N, B, H, L, D) for _ in range(4))
    doc = torch.randint(0, 3, (N, L), generator=g).sort(-1).values
    rel = _rand(g, H, 79)

    def f(q, k, v, do, d, r):
        return (pat(q, k, v, doc=d, rel=r) * do).sum()

    gs = vmap(grad(f, argnums=(0, 1, 2, 5)), in_dims=(0, 0, 0, 0, 0, None))(
        q, k, v, do, doc, rel)
    for i in range(N):
        _, _, rg = _sample_ref(pat, q[i], k[i], v[i], do[i], want=("rel",), doc=doc[i],
                               rel=rel)
        for got, want in zip(gs, rg):
            _close(got[i], want, tol=2e-3)
