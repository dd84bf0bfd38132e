"""The host path of a call without a plan: a call whose arguments match the pattern's last
call (shapes, strides, dtypes, devices, alignment, scale, offset, layout, runtime inputs by
identity and version, settings, tuning, plan cache) reuses its checks and plan; anything
else takes the full path, so no call is ever served another call's plan."""
import pickle
import warnings

import pytest
import torch

import spattn
from spattn import SpattnInputError, SpattnValueError
from spattn.dsl.errors import SpattnConfigError
from spattn.runtime import api, tune, usage
from spattn.runtime.plan import PLANS
from spattn.runtime.reference import attention_reference

pytestmark = pytest.mark.interpreter


def qkv(L=40, H=2, D=16, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, L, D, generator=g, **kw) for _ in range(3))


def check(pat, out, q, k, v, **inputs):
    L, H = q.shape[2], q.shape[1]
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(L, k.shape[2], num_heads=H, **inputs))
    assert torch.allclose(out.double(), ref, atol=1e-4)


@pytest.fixture
def no_full_path(monkeypatch):
    """Make the full path (checks and plan cache) fail: a call that still succeeds was
    served by the memo."""
    def refuse(*a, **k):
        raise AssertionError("the full path ran")

    def arm():
        monkeypatch.setattr(api, "_checked", refuse)
    return arm


def test_a_repeated_call_reuses_the_last_plan(no_full_path):
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = qkv()
    check(pat, pat(q, k, v), q, k, v)
    plan = pat._last[1]
    no_full_path()
    q2, k2, v2 = qkv(seed=1)          # new tensors and values, the same layout: a hit
    check(pat, pat(q2, k2, v2), q2, k2, v2)
    assert pat._last[1] is plan


def test_an_input_written_in_place_is_seen():
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q, k, v = qkv()
    doc = torch.arange(40) // 11
    check(pat, pat(q, k, v, doc=doc), q, k, v, doc=doc)
    first = pat._last[1]
    doc[5:30] = 7                     # same tensor, new values: a new version
    check(pat, pat(q, k, v, doc=doc), q, k, v, doc=doc)
    assert pat._last[1] is not first
    doc2 = doc.clone()                # equal values, another tensor: checked again
    doc2[0] = 3
    check(pat, pat(q, k, v, doc=doc2), q, k, v, doc=doc2)


def test_an_inference_input_is_never_memoised():
    pat = spattn.compile("causal & same(doc)", backend="triton")
    q, k, v = qkv()
    with torch.inference_mode():
        doc = torch.arange(40) // 11
        check(pat, pat(q, k, v, doc=doc), q, k, v, doc=doc)
        assert pat._last is None
        doc[5:30] = 7                 # no version counter: keyed by contents in PLANS
        check(pat, pat(q, k, v, doc=doc), q, k, v, doc=doc)


def test_an_offset_changed_in_place_is_seen():
    """A 0-d numpy array is an integer offset (``__index__``) that equals itself after an
    in-place write: such an offset is never memoised, so the second call gets its own."""
    np = pytest.importorskip("numpy")
    pat = spattn.compile("causal", backend="torch")
    q, k, v = qkv(L=32)
    off = np.array(0)
    pat(q, k, v, q_offset=off)
    off[()] = 20
    out = pat(q, k, v, q_offset=off)
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(32, 32, num_heads=2, q_offset=20))
    assert torch.allclose(out.double(), ref, atol=1e-4)


@pytest.mark.parametrize("change", ["shape", "stride", "dtype", "scale", "q_offset",
                                    "backend"])
def test_a_changed_argument_takes_the_full_path(change, monkeypatch):
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = qkv()
    pat(q, k, v)
    calls = []
    real = api._checked
    monkeypatch.setattr(api, "_checked", lambda *a: calls.append(1) or real(*a))
    kw = {}
    if change == "shape":
        q, k, v = qkv(L=48)
    elif change == "stride":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif change == "dtype":
        q, k, v = (t.double() for t in (q, k, v))
    elif change == "scale":
        kw = {"scale": 0.3}
    elif change == "q_offset":
        kw = {"q_offset": 3}
    else:
        pat.backend = "torch"
    if change == "dtype":
        with pytest.raises(SpattnInputError, match="float64"):
            pat(q, k, v)
        return
    out = pat(q, k, v, **kw)
    assert calls == [1]
    L = q.shape[2]
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(L, L, num_heads=2, q_offset=kw.get("q_offset")),
                                 scale=kw.get("scale"))
    assert torch.allclose(out.double(), ref, atol=1e-4)


def test_bad_arguments_after_a_good_call_are_refused():
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = qkv()
    pat(q, k, v, scale=1)
    with pytest.raises(SpattnValueError, match="scale"):
        pat(q, k, v, scale=True)                    # equal to 1, not a number
    pat(q, k, v, q_offset=1)
    with pytest.raises(SpattnValueError, match="q_offset"):
        pat(q, k, v, q_offset=True)
    with pytest.raises(SpattnInputError, match="meta"):
        pat(q, k.to("meta"), v)
    with pytest.raises(SpattnInputError):
        pat(q, k.to_sparse(), v)


def test_settings_tuning_and_a_cleared_cache_are_seen(monkeypatch):
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = qkv()
    pat(q, k, v)
    first = pat._last[1]
    full = []
    real = api._lookup
    monkeypatch.setattr(api, "_lookup", lambda *a: full.append(1) or real(*a))

    def full_path_runs(step) -> bool:
        n = len(full)
        step()
        pat(q, k, v)
        return len(full) == n + 1
    assert not full_path_runs(lambda: None)
    assert full_path_runs(lambda: monkeypatch.setenv("SPATTN_STRATEGY", "table"))
    assert pat._last[1].call.settings.strategy == "table"
    check(pat, pat(q, k, v), q, k, v)
    monkeypatch.setenv("SPATTN_STRATEGY", "bogus")
    with pytest.raises(SpattnConfigError, match="SPATTN_STRATEGY"):
        pat(q, k, v)
    assert full_path_runs(lambda: monkeypatch.delenv("SPATTN_STRATEGY"))
    assert pat._last[1] is first                    # the plan cache's, for these settings
    assert full_path_runs(tune._bump)               # a new tuning choice
    assert pat._last[1] is not first
    assert full_path_runs(PLANS.clear)
    assert not full_path_runs(lambda: None)


def test_the_layout_warning_is_given_at_every_call(monkeypatch):
    monkeypatch.setattr(usage, "MAX_HEADS", 2)
    pat = spattn.compile("causal", backend="torch")
    q, k, v = qkv(L=20, H=24)
    for _ in range(2):
        with pytest.warns(spattn.SpattnLayoutWarning):
            pat(q, k, v)


def test_forward_and_backward_through_the_memo():
    pat = spattn.compile("causal & window(9)", backend="triton")
    for seed in range(2):             # the second call is served by the memo
        q, k, v = qkv(seed=seed, requires_grad=True)
        do = torch.randn_like(q)
        grads = torch.autograd.grad(pat(q, k, v), (q, k, v), do)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attention_reference(qd, kd, vd, pat.mask(40, 40, num_heads=2))
        want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
        for g, w in zip(grads, want):
            assert torch.allclose(g.double(), w, atol=1e-4)


def test_the_memo_is_not_pickled_nor_part_of_equality():
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = qkv()
    pat(q, k, v)
    assert pat._last is not None
    back = pickle.loads(pickle.dumps(pat))
    assert back._last is None and back == pat and hash(back) == hash(pat)


def test_a_plan_refuses_k_or_v_on_another_device():
    pat = spattn.compile("causal & window(9)", backend="triton")
    q, k, v = qkv()
    plan = pat.plan(q, k, v)
    with pytest.raises(SpattnInputError, match="meta"):
        pat(q, k.to("meta"), v, plan=plan)
    with pytest.raises(SpattnInputError, match="meta"):
        pat(q, k, v.to("meta"), plan=plan)


def test_the_settings_read_sees_every_change(monkeypatch):
    from spattn.runtime import settings
    s = settings.current()
    assert settings.current() is s
    monkeypatch.setenv("SPATTN_TABLES", "csr")
    assert settings.current().tables == "csr"
    monkeypatch.setenv("SPATTN_TABLES", "spans")
    assert settings.current().tables == "spans"
    monkeypatch.delenv("SPATTN_TABLES")
    assert settings.current().raw == s.raw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings.current()


# ----------------------------------------------------------------- property: call sequences

import numpy as np  # noqa: E402
from hypothesis import example, given, settings as hsettings, strategies as st  # noqa: E402

STEPS = ("same", "new-values", "write-doc", "new-doc", "scale", "offset", "offset-in-place",
         "strided", "length", "clear")


@hsettings(max_examples=30)
@given(st.lists(st.sampled_from(STEPS), min_size=1, max_size=6), st.integers(0, 2**16))
@example(["write-doc", "write-doc"], 0)
@example(["scale", "same", "offset", "same"], 1)
@example(["offset-in-place", "offset-in-place"], 2)
def test_any_call_sequence_gives_each_calls_answer(steps, seed):
    """A sequence of calls of one pattern, each changing something (or nothing) since the
    last: every output is the dense reference of that call's own arguments, whichever of
    them the memo served (the torch backend: the memo is the call path's, not a
    backend's)."""
    pat = spattn.compile("causal & same(doc) & window(W)", backend="torch", W=12)
    g = torch.Generator().manual_seed(seed)
    L = 24
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    doc = torch.randint(0, 3, (L + 4,), generator=g).sort().values  # room for an offset
    kw = {}
    for step in ["same"] + steps:
        if step == "new-values":
            q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
        elif step == "write-doc":
            doc[int(torch.randint(0, L, (1,), generator=g))] = 5
        elif step == "new-doc":
            doc = torch.randint(0, 3, (L + 4,), generator=g).sort().values
        elif step == "scale":
            kw["scale"] = float(torch.rand((), generator=g)) + 0.05
        elif step == "offset":
            kw["q_offset"] = int(torch.randint(0, 5, (), generator=g))
        elif step == "offset-in-place":     # a 0-d numpy array: written in place
            value = int(torch.randint(0, 5, (), generator=g))
            if isinstance(kw.get("q_offset"), np.ndarray):
                kw["q_offset"][()] = value
            else:
                kw["q_offset"] = np.array(value)
        elif step == "strided":
            q, k, v = (torch.randn(1, L, 2, 16, generator=g).transpose(1, 2)
                       for _ in range(3))
        elif step == "length":
            L = 20 if L == 24 else 24
            q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
            doc = torch.randint(0, 3, (L + 4,), generator=g).sort().values
        elif step == "clear":
            PLANS.clear()
        out = pat(q, k, v, doc=doc, **kw)
        off = kw.get("q_offset")
        mask = pat.mask(L, L, num_heads=2, q_offset=None if off is None else int(off),
                        doc=doc)
        ref, _ = attention_reference(q.double(), k.double(), v.double(), mask,
                                     scale=kw.get("scale"))
        assert torch.allclose(out.double(), ref, atol=1e-5), step


def _scored_reference(pat, q, k, v, **tables):
    from spattn.runtime.reference import pattern_reference
    ref, _ = pattern_reference(pat, q.double(), k.double(), v.double(),
                               **{n: t.double() for n, t in tables.items()})
    return ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_scored_call_reuses_its_checks_and_sees_its_tables(backend, monkeypatch):
    """A pattern with a score: a repeated call skips the checks (they read the tables'
    shapes only), a table written in place is read at its new values, a table of another
    shape takes the full path (and is refused when too small), and a divisor read from a
    table is checked at every call."""
    from spattn.runtime import scores
    pat = spattn.compile("causal & window(12)", score="s + rel[h, clamp(q - k, 0, 11)]",
                         backend=backend)
    q, k, v = qkv()
    rel = torch.randn(2, 12)
    out = pat(q, k, v, rel=rel)
    assert torch.allclose(out.double(), _scored_reference(pat, q, k, v, rel=rel), atol=1e-4)
    plan = pat._last[1][0]

    def refuse(*a, **kw):
        raise AssertionError("the full path ran")
    with monkeypatch.context() as m:
        m.setattr(scores, "_arguments", refuse)
        rel.mul_(-2.0).add_(0.5)                        # in place: new values, same shape
        q2, k2, v2 = qkv(seed=3)
        out = pat(q2, k2, v2, rel=rel)
        assert pat._last[1][0] is plan
        assert torch.allclose(out.double(), _scored_reference(pat, q2, k2, v2, rel=rel),
                              atol=1e-4)
    with pytest.raises(SpattnInputError, match="rel"):
        pat(q, k, v, rel=torch.randn(2, 6))             # another shape: checked, too short
    soft = spattn.compile("causal", score="softcap(cap[h])", backend=backend)
    cap = torch.full((2,), 20.0)
    soft(q, k, v, cap=cap)
    cap[1] = 0.0                                        # the divisor's values: every call
    with pytest.raises(SpattnInputError, match="divides by"):
        soft(q, k, v, cap=cap)


def test_a_learnable_parameter_table_keeps_the_memo():
    """A module's table is an ``nn.Parameter``: the memo takes it (its shape is what the
    checks read), and an optimiser step written in place is seen by the next call."""
    pat = spattn.compile("causal & window(12)", score="s + rel[h, clamp(q - k, 0, 11)]",
                         backend="torch")
    q, k, v = qkv()
    rel = torch.nn.Parameter(torch.randn(2, 12))
    pat(q, k, v, rel=rel)
    assert pat._last is not None
    plan = pat._last[1][0]
    with torch.no_grad():
        rel.add_(1.5)
    out = pat(q, k, v, rel=rel)
    assert pat._last[1][0] is plan
    assert torch.allclose(out.double(), _scored_reference(pat, q, k, v, rel=rel.detach()),
                          atol=1e-4)


def test_explain_prices_the_gathers_a_torch_call_would_use(monkeypatch):
    """Under SPATTN_LAYOUT_GATHER=auto, explain() for a torch-backend pattern prices the
    copies its plan would make (the torch backend never uses row tables)."""
    monkeypatch.delenv("SPATTN_LAYOUT_GATHER", raising=False)
    pat = spattn.compile("dilated(256, 4)", backend="torch")
    lay = pat.explain(4096).layout
    assert lay is not None and lay["gather"] == "copy"


def test_a_bound_launch_keeps_no_tensor_of_its_first_call(monkeypatch):
    """A bound launch (``triton_backend.BoundLaunch``) keeps the first launch's arguments
    after its per-call head only: the first call's tensors go when the call does (kept,
    a plan held on to every first call's q, k, v, o and gradients), and each later launch
    passes its own head before the kept arguments. A head shorter than the first one's
    launches nothing. The CUDA-only parts (the JIT's binder, the driver, the compiled
    launcher) are stand-ins here."""
    import types
    import weakref

    import triton.runtime
    from spattn.runtime import triton_backend as tb

    class Binder:
        def __call__(self, *args, **meta):
            return dict(zip(("q", "o", "n", "static", "BLOCK"), (*args, meta["BLOCK"]))), 0, 0

    launched = []

    class Compiled:
        packed_metadata, function = object(), object()

        def run(self, *a):
            launched.append(a[9:])

    fake_driver = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda dev: 0))
    hooks = types.SimpleNamespace(calls=0)
    monkeypatch.setattr(triton.runtime, "driver", fake_driver, raising=False)
    monkeypatch.setattr(tb, "_TRITON_RUNTIME", (types.SimpleNamespace(
        launch_enter_hook=hooks, launch_exit_hook=hooks), fake_driver))
    kernel = types.SimpleNamespace(device_caches={0: (None,) * 4 + (Binder(),)})
    q, o = torch.randn(4, 4), torch.empty(4, 4)
    gone = weakref.ref(q), weakref.ref(o)
    launch = tb.BoundLaunch.of(kernel, Compiled(), (3,), (q, o, 7, "static"), {"BLOCK": 16},
                               torch.device("cuda"), 2)
    assert launch.values == (None, None, 7, "static", 16)
    del q, o
    assert [r() for r in gone] == [None, None]
    q2, o2 = torch.randn(4, 4), torch.empty(4, 4)
    assert launch(q2, o2)
    assert launched[-1][0] is q2 and launched[-1][1] is o2 and launched[-1][2:] == (7, "static", 16)
    assert not launch(q2) and len(launched) == 1
    assert tb.kept_values((1, 2, 3), 0) == (1, 2, 3)


def test_a_bound_launch_calls_the_c_launcher_and_encodes_a_descriptor_once(monkeypatch):
    """Where Triton's launcher has the form of triton 3.6's ``CudaLauncher`` (its
    ``launch`` the closure ``wrap_handle_tensordesc`` makes around the C launcher), a bound
    launch calls the C launcher itself with the arguments Triton's closure passes, a
    descriptor's map encoded once per address, shape and strides and reused after that
    (Triton encodes every descriptor at every launch); a listening profiler, or
    ``RAW_LAUNCH`` off, takes Triton's path. The closure is Triton's own; the C launcher,
    the encoder, the binder and the driver are stand-ins."""
    import types

    import triton.runtime
    from triton.backends.nvidia import driver as nv
    from triton.tools.tensor_descriptor import TensorDescriptor
    from spattn.runtime import triton_backend as tb

    encoded = []

    def fill(ptr, swizzle, elem_size, elem_type, block, shape, strides, padding):
        encoded.append(ptr)
        return ("map", ptr, swizzle, tuple(block), tuple(shape), tuple(strides), padding)

    class CLaunch:                  # the compiled C launcher: not a Python function
        def __init__(self):
            self.calls = []

        def __call__(self, *args):
            self.calls.append(args)

    class Launcher:                 # CudaLauncher's attributes and its __call__
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True

        def __init__(self, launch):
            self.launch = launch

        def __call__(self, gx, gy, gz, stream, function, *args):
            self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid,
                        self.launch_pdl, None, None, *args)

    names = ("q_desc", "n", "t_desc", "BLOCK")
    signature = {"q_desc": "tensordesc<bf16[1, 1, 64, 32]>", "n": "i32",
                 "t_desc": "tensordesc<fp32[64]>", "BLOCK": "constexpr"}
    meta = [dict(swizzle=128, elem_size=2, elem_type=5, block_size=[1, 1, 64, 32],
                 fp4_padded=False),
            dict(swizzle=0, elem_size=4, elem_type=7, block_size=[64], fp4_padded=False)]
    c_launch = CLaunch()
    compiled = types.SimpleNamespace(packed_metadata="packed", function="fn",
                                     launch_metadata=lambda grid, stream, *args: None,
                                     run=Launcher(nv.wrap_handle_tensordesc(c_launch,
                                                                            signature, meta)))

    class Binder:
        def __call__(self, *args, **kw):
            return dict(zip(names, (*args, kw["BLOCK"]))), 0, 0

    fake_driver = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda dev: 9,
        utils=types.SimpleNamespace(fill_tma_descriptor=fill)))
    hooks = types.SimpleNamespace(calls=0)
    monkeypatch.setattr(triton.runtime, "driver", fake_driver, raising=False)
    monkeypatch.setattr(tb, "_TRITON_RUNTIME", (types.SimpleNamespace(
        launch_enter_hook=hooks, launch_exit_hook=hooks), fake_driver))
    kernel = types.SimpleNamespace(device_caches={0: (None,) * 4 + (Binder(),)})

    def desc(t):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 64, 32])

    table = torch.randn(128)
    t_desc = TensorDescriptor(table, [128], [1], [64])
    q1, q2 = (torch.randn(1, 2, 128, 32) for _ in range(2))
    launch = tb.BoundLaunch.of(kernel, compiled, (4, 2), (desc(q1), 7, t_desc), {"BLOCK": 16},
                               torch.device("cuda"), 1)
    assert launch.raw is not None and launch.raw[2:] == (False, True)

    def triton_args(d):             # what Triton's own path gives the C launcher
        before = len(c_launch.calls)
        with monkeypatch.context() as m:
            m.setattr(tb, "RAW_LAUNCH", False)
            assert launch(d)
        assert len(c_launch.calls) == before + 1
        return c_launch.calls.pop()

    for d, new in ((desc(q1), 2), (desc(q1), 0), (desc(q2), 1), (desc(q1[:, :1]), 1)):
        n = len(encoded)
        assert launch(d)
        assert len(encoded) == n + new
        got = c_launch.calls.pop()
        assert got[:13] == (4, 2, 1, 9, "fn", False, True, None, None, "packed", None, None, None)
        assert got == triton_args(d)
        assert got[13][:2] == ("map", d.base.data_ptr()) and got[13][4] == tuple(d.shape)
        assert got[14:22] == (*d.shape, *d.strides) and got[22] == 7
        assert got[23][:2] == ("map", table.data_ptr()) and got[24:] == (128, 1, 16)
    hooks.calls = 1                 # a profiler listens: Triton's path, every map encoded
    n = len(encoded)
    assert launch(desc(q1)) and len(encoded) == n + 2
    hooks.calls = 0
    monkeypatch.setattr(tb, "TENSOR_MAPS", 2)
    for t in (q1, q2, torch.randn(1, 2, 128, 32)):      # a full memo starts again
        assert launch(desc(t))
    assert len(launch.raw[1][0].maps) == 1
    n = len(c_launch.calls)
    assert not launch() and len(c_launch.calls) == n
