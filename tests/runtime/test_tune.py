"""Persisted autotuning (runtime/tune.py), driven on the CPU by a fake timer and launcher."""
import json
import logging
import os

import pytest
import torch
import triton.language  # noqa: F401  (imported here, under conftest's TRITON_INTERPRET)


import spattn
from spattn.codegen import config as st
from spattn.runtime.settings import interpreting
from spattn.runtime import settings, tune, triton_backend

pytestmark = pytest.mark.interpreter

CUDA = torch.device("cuda", 0)     # only its type is looked at: no GPU needed
# Triton's language helpers are interpreted only if imported under TRITON_INTERPRET=1.
INTERPRETED = interpreting(os.environ.get("TRITON_INTERPRET"))


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SPATTN_AUTOTUNE", raising=False)
    for var in settings.VARIABLES:
        if var != "SPATTN_CACHE_DIR":
            monkeypatch.delenv(var, raising=False)
    tune.clear_memory()
    yield
    tune.clear_memory()


def tile_fields(kind):
    """The numeric tile options (the fused/split loop choice is tested separately)."""
    return tuple(n for n in tune.FIELDS[kind] if n != "loop")


class Fake:
    """A launcher recording the options it runs with, and a timer reading a table."""

    def __init__(self, kind, times=None, fail=()):
        self.kind = kind
        self.times = times or {}
        self.fail = set(fail)
        self.runs = []
        self.last = None

    def cfg(self, opts):
        return tuple(opts[n] for n in tile_fields(self.kind))

    def run(self, opts):
        c = self.cfg(opts)
        self.runs.append(c)
        if c in self.fail:
            raise RuntimeError(f"out of resources: shared memory for {c}")
        self.last = c
        return "result"

    def timer(self, fn):
        fn()
        return self.times.get(self.last, 10.0)


def call(fake, pat=None, *, kind="fwd", D=128, dtype=torch.bfloat16, Lq=4096, Lk=4096,
         device=CUDA, options=None, BH=16):
    pat = pat or spattn.compile("causal")
    return tune.tuned_options(pat, kind, head_dim=D, dtype=dtype, device=device, Lq=Lq, Lk=Lk,
                              options=dict(options or {}), run=fake.run, timer=fake.timer,
                              BH=BH)


def chosen(opts, kind="fwd", fields=None):
    return tuple(opts[n] for n in (fields or tile_fields(kind)))


def tune_files():
    d = tune.tune_dir()
    return sorted(os.listdir(d)) if d.exists() else []


def test_candidates_default_first_and_fit_head_dim():
    f = tune.candidates("fwd", 128, "bf16")
    full = tune.FIELDS["fwd"]
    assert chosen(f[0]) == (64, 64, 4, 3) == st.default_tiles(128, "bf16", interpret=False)
    loops = {(*c, loop) for c in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
             for loop in ("fused", "persistent")}
    assert {chosen(c, fields=full) for c in f} == {
        (128, 64, 8, 3, "split"), (128, 128, 8, 3, "split"), (64, 64, 4, 3, "split"),
        (64, 128, 4, 3, "split")} | loops
    b = tune.candidates("bwd", 128, "fp16")
    assert chosen(b[0], "bwd") == (32, 64, 64, 32, 4, 3)
    assert len(b) == 8 and len({chosen(c, "bwd") for c in b}) == 4
    assert {c["loop"] for c in b} == {"split", "fused"}     # every tile config, both loops
    for kind in ("fwd", "bwd"):     # D > 128: small tiles only
        for c in tune.candidates(kind, 256, "bf16"):
            assert all(v <= 64 for n, v in c.items() if n.startswith("block_")), c
    assert chosen(tune.candidates("fwd", 64, "bf16")[0]) == (64, 64, 4, 3)


def test_new_backward_defaults():
    p = spattn.compile("causal")
    gpu = dict(interpret=False, strategy="table")
    c = st.pick(p, "bwd", head_dim=128, dtype="bf16", **gpu)
    assert (c.block_m, c.block_n, c.block_m2, c.block_n2, c.num_warps, c.num_stages) == \
        (32, 64, 64, 32, 4, 3)
    c = st.pick(p, "bwd", head_dim=256, dtype="bf16", **gpu)
    assert (c.block_m, c.block_n, c.block_m2, c.block_n2, c.num_warps, c.num_stages) == \
        (32, 64, 64, 32, 4, 2)
    c = st.pick(p, "bwd", head_dim=128, dtype="fp32", **gpu)
    assert (c.block_m, c.block_n, c.block_m2, c.block_n2) == (32, 32, 32, 32)
    f = st.pick(p, "fwd", head_dim=128, dtype="bf16", **gpu)
    assert (f.block_m, f.block_n, f.num_warps, f.num_stages) == (64, 64, 4, 3)


def test_picks_fastest_and_logs(caplog):
    fake = Fake("fwd", {(128, 64, 8, 3): 0.50, (128, 128, 8, 3): 0.48, (64, 64, 4, 3): 0.31,
                        (64, 128, 4, 3): 0.40})
    with caplog.at_level(logging.INFO, logger="spattn"):
        opts = call(fake, options={"strategy": "table"})
    assert chosen(opts) == (64, 64, 4, 3)
    assert opts["strategy"] == "table"          # the call's own options are kept
    assert sorted(set(fake.runs)) == sorted({chosen(c) for c in tune.candidates("fwd", 128, "bf16")})
    msg = (f"autotuned fwd for {tune.label(spattn.compile('causal'))}: "
           "block_m=64 block_n=64 num_warps=4 num_stages=3 loop=split (0.3100 ms)")
    assert any(msg == r.getMessage() for r in caplog.records)
    # the same call again: memory, no timing
    n = len(fake.runs)
    assert chosen(call(fake, options={"strategy": "table"})) == (64, 64, 4, 3)
    assert len(fake.runs) == n


def test_backward_tuning():
    fake = Fake("bwd", {(32, 64, 64, 32, 4, 3): 2.0, (64, 128, 128, 32, 8, 2): 1.5})
    opts = call(fake, kind="bwd")
    assert chosen(opts, "bwd") == (64, 128, 128, 32, 8, 2)
    assert set(opts) == set(tune.FIELDS["bwd"])


def test_failing_candidates_are_skipped():
    fake = Fake("fwd", {(128, 64, 8, 3): 0.5, (128, 128, 8, 3): 0.1, (64, 64, 4, 3): 0.3,
                        (64, 128, 4, 3): 0.4}, fail={(128, 128, 8, 3)})
    opts = call(fake, options={"strategy": "table"})
    assert chosen(opts) == (64, 64, 4, 3)
    (name,) = tune_files()
    data = json.loads((tune.tune_dir() / name).read_text())
    errs = [t for t in data["timings"] if "error" in t]
    # (128, 128, 8, 3) is timed three times, as the split, fused and persistent kernel
    assert len(errs) == 3 and all("out of resources" in e["error"] for e in errs)
    assert data["config"] == dict(zip(tune.FIELDS["fwd"], (64, 64, 4, 3, "split")))


def test_all_candidates_failing_uses_defaults():
    every = {chosen(c) for c in tune.candidates("fwd", 128, "bf16")}
    fake = Fake("fwd", fail=every)
    opts = call(fake, options={"strategy": "table"})
    assert opts == {"strategy": "table"}
    assert tune_files() == []                    # nothing persisted
    n = len(fake.runs)
    call(fake, options={"strategy": "table"})    # remembered for the process
    assert len(fake.runs) == n


def test_persisted_across_processes():
    fake = Fake("fwd", {(64, 128, 4, 3): 0.2})
    assert chosen(call(fake)) == (64, 128, 4, 3)
    files = tune_files()
    assert len(files) == 1 and files[0].endswith(".json")
    data = json.loads((tune.tune_dir() / files[0]).read_text())
    assert data["pattern"] == "q >= k" and data["kind"] == "fwd"
    assert data["source"] == "q >= k"
    assert data["dtype"] == "bf16" and data["block_d"] == 128
    assert data["lq_bucket"] == data["lk_bucket"] == 4096
    assert data["bh_bucket"] == 16 and data["tma"] is False
    assert files[0] == data["key"] + ".json"
    tune.clear_memory()                          # a new process
    again = Fake("fwd")
    assert chosen(call(again)) == (64, 128, 4, 3)
    assert again.runs == []                      # read from disk, not re-tuned


def test_key_buckets_and_fields():
    fake = Fake("fwd")
    call(fake, Lq=3000, Lk=4096)
    n = len(fake.runs)
    call(fake, Lq=4096, Lk=2049)                 # same buckets (4096, 4096)
    call(fake, BH=9)                             # same batch x heads bucket (16)
    assert len(fake.runs) == n
    for kw in (dict(Lq=4097), dict(Lk=1024), dict(D=64), dict(dtype=torch.float16),
               dict(kind="bwd"), dict(pat=spattn.compile("window(128)")),
               dict(options={"strategy": "table"}), dict(BH=17), dict(BH=2),
               dict(options={"tma": True})):
        k = kw.get("kind", "fwd")
        f = Fake(k)
        call(f, **kw)
        assert f.runs, kw                         # a new key: tuned
    assert len(tune_files()) == 11


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"key": "x"}',
                                     "VALID_BAD_CONFIG"])
def test_corrupt_file_is_retuned_with_warning(garbage):
    fake = Fake("fwd", {(64, 64, 4, 3): 0.1})
    call(fake)
    (name,) = tune_files()
    path = tune.tune_dir() / name
    if garbage == "VALID_BAD_CONFIG":
        data = json.loads(path.read_text())
        data["config"]["block_m"] = 33
        garbage = json.dumps(data)
    path.write_text(garbage)
    tune.clear_memory()
    again = Fake("fwd", {(128, 128, 8, 3): 0.1})
    with pytest.warns(RuntimeWarning, match="autotune file .* is invalid"):
        opts = call(again)
    assert again.runs and chosen(opts) == (128, 128, 8, 3)
    assert json.loads(path.read_text())["config"]["block_m"] == 128   # rewritten


def test_disabled_by_environment(monkeypatch):
    for off in ("0", "false", "off"):
        monkeypatch.setenv("SPATTN_AUTOTUNE", off)
        fake = Fake("fwd")
        assert call(fake, options={"strategy": "ranges"}) == {"strategy": "ranges"}
        assert fake.runs == []
    assert tune_files() == []
    monkeypatch.setenv("SPATTN_AUTOTUNE", "1")
    fake = Fake("fwd")
    call(fake)
    assert fake.runs


def test_never_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPATTN_AUTOTUNE", "1")
    fake = Fake("fwd")
    assert call(fake) == {}
    assert fake.runs == [] and tune_files() == []
    assert not tune.enabled(CUDA)


def test_only_on_cuda():
    fake = Fake("fwd")
    assert call(fake, device=torch.device("cpu")) == {}
    assert fake.runs == []


@pytest.mark.parametrize("explicit", [{"block_m": 64}, {"num_warps": 4}, {"num_stages": 2},
                                      {"block_n1": 64}])
def test_explicit_options_are_not_tuned(explicit):
    for kind in ("fwd", "bwd"):
        fake = Fake(kind)
        assert call(fake, kind=kind, options=explicit) == explicit
        assert fake.runs == []


@pytest.mark.parametrize("var,kind", [("SPATTN_BLOCK_M", "fwd"), ("SPATTN_FWD_WARPS", "fwd"),
                                      ("SPATTN_BWD_BLOCK_N2", "bwd"),
                                      ("SPATTN_NUM_STAGES", "bwd")])
def test_environment_overrides_are_not_tuned(monkeypatch, var, kind):
    monkeypatch.setenv(var, "2" if "STAGES" in var else "8" if "WARPS" in var else "64")
    fake = Fake(kind)
    assert call(fake, kind=kind) == {}
    assert fake.runs == []


def test_atomic_write_leaves_no_temporary(monkeypatch):
    replaced = []
    real = os.replace

    def spy(src, dst):
        assert not os.path.exists(dst)          # the final name appears only here
        assert os.path.dirname(str(src)) == os.path.dirname(str(dst))
        replaced.append((str(src), str(dst)))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", spy)
    call(Fake("fwd"))
    assert len(replaced) == 1
    assert tune_files() == [os.path.basename(replaced[0][1])]
    assert not any(n.endswith(".tmp") for n in tune_files())


def test_failed_write_warns_and_keeps_choice_in_memory(monkeypatch):
    def boom(src, dst):
        raise OSError("read-only file system")
    monkeypatch.setattr(os, "replace", boom)
    fake = Fake("fwd", {(64, 64, 4, 3): 0.1})
    with pytest.warns(RuntimeWarning, match="could not write autotune file"):
        opts = call(fake)
    assert chosen(opts) == (64, 64, 4, 3)
    assert tune_files() == []                    # the temporary file was removed
    n = len(fake.runs)
    assert chosen(call(fake)) == (64, 64, 4, 3)
    assert len(fake.runs) == n


@pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter (CPU run)")
def test_launchers_run_with_the_tuned_choice(monkeypatch):
    """End to end through triton_backend under the interpreter (tuning forced on): every
    candidate runs for real, the last one is 'fastest', and the result is right."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPATTN_TUNE_REPS", "1")      # each timing runs the interpreter
    monkeypatch.setattr(tune, "enabled", lambda device, settings=None: True)
    seen = []
    real_fwd, real_bwd = triton_backend._build_fwd, triton_backend._build_bwd

    def spy_fwd(call, q, k, v, opts, **kw):
        seen.append(("fwd", {n: opts.get(n) for n in tune.FIELDS["fwd"]}))
        return real_fwd(call, q, k, v, opts, **kw)

    def spy_bwd(call, q, k, v, o, do, opts, **kw):
        seen.append(("bwd", {n: opts.get(n) for n in tune.FIELDS["bwd"]}))
        return real_bwd(call, q, k, v, o, do, opts, **kw)
    monkeypatch.setattr(triton_backend, "_build_fwd", spy_fwd)
    monkeypatch.setattr(triton_backend, "_build_bwd", spy_bwd)
    def timer(fn):                               # the second candidate of each kind: 2x faster
        fn()
        o = seen[-1][1]
        return 1.0 if o.get("block_m") == 16 or o.get("block_m1") == 32 else 2.0
    monkeypatch.setattr(tune, "default_timer", timer)
    monkeypatch.setattr(tune, "candidates", lambda kind, D, dt, **kw: [
        dict(zip(tune.FIELDS[kind], c + (("split",) if kind == "fwd" else ()))) for c in
        ([(32, 32, 4, 1), (16, 32, 4, 1)] if kind == "fwd"
         else [(16, 16, 16, 16, 4, 1), (32, 16, 16, 32, 4, 1)])])
    pat = spattn.compile("causal & (window(20) | sink(4))", backend="triton")
    g = torch.Generator().manual_seed(0)
    L, D = 45, 16
    q, k, v = (torch.randn(1, 2, L, D, generator=g, dtype=torch.float64).float()
               .requires_grad_() for _ in range(3))
    out = pat(q, k, v)
    last = [s for s in seen if s[0] == "fwd"][-1][1]
    assert (last["block_m"], last["block_n"]) == (16, 32)     # the call ran with the choice
    out.sum().backward()
    lastb = [s for s in seen if s[0] == "bwd"][-1][1]
    assert (lastb["block_m1"], lastb["block_n1"]) == (32, 16)
    from spattn.runtime.reference import attention_reference
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(qd, kd, vd, pat.mask(L, L, num_heads=2))
    ref.sum().backward()
    assert torch.allclose(out.double(), ref, atol=1e-4)
    for t, r in zip((q, k, v), (qd, kd, vd)):
        assert torch.allclose(t.grad.double(), r.grad, atol=1e-4)
    assert len(tune_files()) == 2
    # both kinds keyed by the call's row bucket: 45 rows in one 64-tile row, all 1 tile wide
    for f in tune_files():
        assert json.loads((tune.tune_dir() / f).read_text())["rows_bucket"] == 0


def test_precompile_submits_every_candidate_in_async_mode():
    """The candidates are compiled up front inside Triton's AsyncCompileMode (so Triton's
    compilations go to a thread pool); a candidate failing there is left to its timed run."""
    from triton.runtime import _async_compile
    seen, modes = [], []

    def compile_only(opts):
        modes.append(_async_compile.active_mode.get())
        seen.append(chosen(opts))
        if chosen(opts) == (128, 128, 8, 3):
            raise RuntimeError("out of resources")

    cands = tune.candidates("fwd", 128, "bf16")
    tune.precompile(cands, {"strategy": "ranges"}, compile_only, workers=2)
    assert seen == [chosen(c) for c in cands]
    assert all(m is not None for m in modes) and _async_compile.active_mode.get() is None
    # tune() precompiles, then runs and times every candidate as before
    fake = Fake("fwd", {(64, 64, 4, 3): 0.2})
    compiled = []
    best, timings, _ = tune.tune(spattn.compile("causal"), "fwd", head_dim=128, dtype="bf16",
                              options={}, run=fake.run, timer=fake.timer,
                              compile_only=lambda o: compiled.append(chosen(o)))
    assert chosen(best) == (64, 64, 4, 3)
    assert compiled == [chosen(c) for c in tune.candidates("fwd", 128, "bf16")]
    assert len(timings) == len(compiled)


class Sequenced:
    """A launcher and timer where each full configuration (loop included) reads its own
    sequence of times, one per timing, the last repeated; ``"fail"`` raises."""

    def __init__(self, times):
        self.times = {k: list(v) for k, v in times.items()}
        self.timed = []
        self.last = None

    def run(self, opts):
        self.last = tuple(opts[n] for n in tune.FIELDS["fwd"])
        return "result"

    def timer(self, fn):
        fn()
        self.timed.append(self.last)
        seq = self.times.get(self.last, [10.0])
        t = seq.pop(0) if len(seq) > 1 else seq[0]
        if t == "fail":
            raise RuntimeError("out of memory")
        return t


A, B, C = (64, 64, 4, 3, "split"), (64, 64, 4, 3, "fused"), (128, 64, 8, 3, "fused")


SCR = tune.SCREENS                  # timings of every candidate in the screening passes
FIN = SCR + settings.TUNE_REPS      # timings of a finalist: the screens and the re-timings


@pytest.mark.parametrize("times, winner, finalists", [
    # B's first timing was lucky: re-timed, its median is 12% slower; the default stays
    ({A: [0.500], B: [0.495, 0.56]}, A, {A, B}),
    # a 10% lead is beyond the margin
    ({A: [0.500], B: [0.450]}, B, {A, B}),
    # a consistent 2% lead is within the 3% margin: the default stays
    ({A: [0.500], B: [0.490]}, A, {A, B}),
    # the default's first timing was slow (clocks still rising): it is re-timed anyway
    ({A: [0.800, 0.500], B: [0.490], C: [0.492]}, A, {A, B, C}),
    # two challengers within TIE of each other: the earlier of them
    ({A: [0.600], B: [0.500], C: [0.498]}, B, {A, B, C}),
    # one failure while re-timing disqualifies
    ({A: [0.500], B: [0.40, 0.40, 0.40, "fail", 0.40]}, A, {A, B}),
    # slow re-timings of the default (another process on the device) do not unseat it
    ({A: [0.500, 0.500, 0.7, 0.7, 0.5], B: [0.495]}, A, {A, B}),
    # fast while cold (the screens), slower once the device is busy (the re-timings):
    # what later calls see decides, so the default stays
    ({A: [0.500], C: [0.45, 0.45, 0.56]}, A, {A, C}),
    # the default fails: the best challenger wins without a margin
    ({A: ["fail"], B: [0.500], C: [0.495]}, C, {B, C}),
], ids=["lucky-first", "lead-beyond-margin", "lead-within-margin", "slow-first-default",
        "challengers-tie", "fail-on-retime", "slow-retimings", "slows-down-when-busy",
        "default-fails"])
def test_select_retimes_finalists_and_keeps_the_default(times, winner, finalists):
    fake = Sequenced(times)
    opts = call(fake, options={"strategy": "ranges"})
    assert chosen(opts, fields=tune.FIELDS["fwd"]) == winner
    for c in tune.candidates("fwd", 128, "bf16"):
        c = tuple(c.values())
        failed = times.get(c, [0])[0] == "fail"         # timed once, then skipped
        assert fake.timed.count(c) == (FIN if c in finalists else 1 if failed else SCR), c
    (name,) = tune_files()
    data = json.loads((tune.tune_dir() / name).read_text())
    rec = {tuple(t["config"][n] for n in tune.FIELDS["fwd"]): t for t in data["timings"]}
    assert {c for c in rec if "runoff" in rec[c]} == finalists
    assert data["ms"] == rec[winner]["judged"]
    assert data["reps"] == settings.TUNE_REPS and data["margin"] == settings.TUNE_MARGIN


def test_reps_and_margin_are_settings(monkeypatch):
    monkeypatch.setenv("SPATTN_TUNE_MARGIN", "0.01")
    monkeypatch.setenv("SPATTN_TUNE_REPS", "2")
    fake = Sequenced({A: [0.500], B: [0.490]})         # 2%: beyond a 1% margin
    assert chosen(call(fake), fields=tune.FIELDS["fwd"]) == B
    assert fake.timed.count(A) == fake.timed.count(B) == SCR + 2
    tune.clear_memory()
    for f in tune_files():
        os.remove(tune.tune_dir() / f)
    monkeypatch.setenv("SPATTN_TUNE_REPS", "0")        # no re-timing: first timings only
    fake = Sequenced({A: [0.500], B: [0.45, 0.9]})
    assert chosen(call(fake), fields=tune.FIELDS["fwd"]) == B
    assert fake.timed.count(B) == SCR


def test_no_retiming_of_slow_candidates():
    fake = Sequenced({A: [0.50], C: [0.30]})
    opts = call(fake, options={"strategy": "ranges"})
    assert chosen(opts, fields=tune.FIELDS["fwd"]) == C
    # the two fastest (C, and A, the default) are the finalists; the others at 10.0 are not
    assert len(fake.timed) == SCR * len(tune.candidates("fwd", 128, "bf16")) \
        + 2 * settings.TUNE_REPS
    (name,) = tune_files()
    data = json.loads((tune.tune_dir() / name).read_text())
    assert data["ms"] == 0.30 and sum("runoff" in t for t in data["timings"]) == 2


class Noisy:
    """A fake GPU for :func:`tune.tune`: each candidate's true time (a pair: while the
    device is cool, during the screens, and once it is busy), times uniform noise of
    +-``noise``, a slow measurement (+25%) one time in ten, and clocks still rising over
    the process's first timings (the earliest look up to 15% slower)."""

    def __init__(self, true, seed, noise=0.02):
        import random
        self.rng, self.noise, self.n = random.Random(seed), noise, 0
        # (time while the device is cool, time once busy): busy after the screens
        self.pairs = [t if isinstance(t, tuple) else (t, t) for t in true]
        self.cands = [tuple(c.values()) for c in tune.candidates("fwd", 128, "bf16")]
        self.last = None

    def run(self, opts):
        self.last = self.cands.index(tuple(opts[n] for n in tune.FIELDS["fwd"]))

    def timer(self, fn):
        fn()
        self.n += 1
        cool, busy = self.pairs[self.last]
        t = (cool if self.n <= 2 * len(self.pairs) else busy) \
            * (1 + self.rng.uniform(-self.noise, self.noise))
        if self.rng.random() < 0.1:
            t *= 1.25
        return t * (1 + 0.15 * 0.7 ** self.n)

    def pick(self):
        best, timings, _ = tune.tune(spattn.compile("causal"), "fwd", head_dim=128,
                                     dtype="bf16", options={}, run=self.run, timer=self.timer)
        first = min(range(len(timings)), key=lambda i: timings[i]["screens"][0])
        return self.cands.index(tuple(best.values())), first


# true times of the 10 forward candidates, the default (the prior) first
BEYOND = [1.00, 1.12, 0.85, 1.05, 0.99, 1.30, 0.97, 1.20, 1.10, 0.98]  # #2: 15% faster
WITHIN = [1.00, 1.04, 0.995, 1.06, 1.01, 1.30, 0.998, 1.20, 1.10, 0.997]  # none > 0.5%
# #3 is 12% faster while the device is cool, 8% slower once busy (a power cap)
BUSY = [1.00, 1.04, 0.995, (0.88, 1.08), 1.01, 1.30, 0.998, 1.20, 1.10, 0.997]


@pytest.mark.parametrize("true, winner", [(BEYOND, 2), (WITHIN, 0), (BUSY, 0)],
                         ids=["gap-beyond-margin", "gap-within-margin", "slows-when-busy"])
def test_choice_agrees_across_processes(true, winner):
    """Thirty 'processes' (seeds) of noisy timings with rising clocks make one choice: the
    truly fastest when it beats the default by more than the margin, else the default
    (also against a candidate fast only while the device is cool); the fastest first
    timing alone would not agree with itself."""
    picks, firsts = set(), set()
    for seed in range(30):
        pick, first = Noisy(true, seed).pick()
        picks.add(pick)
        firsts.add(first)
    assert picks == {winner}
    if true is WITHIN:
        assert len(firsts) > 1          # the noise is real: one timing each would flip


def test_row_bucket_separates_calls():
    """Two calls whose row buckets differ tune separately; equal buckets share a choice
    (in memory and on disk); the bucket is computed only when tuning applies."""
    fake = Fake("fwd")
    asked = []
    docs = spattn.compile("causal & same(doc)")

    def tuned(rows, device=CUDA, pat=docs):
        return tune.tuned_options(pat, "fwd", head_dim=128, dtype=torch.bfloat16,
                                  device=device, Lq=16384, Lk=16384, options={},
                                  run=fake.run, timer=fake.timer, BH=16,
                                  rows=lambda: asked.append(rows) or rows)
    tuned(9, device=torch.device("cpu"))
    assert asked == [] and fake.runs == []         # no tuning on the CPU: not computed
    tuned(3)
    n = len(fake.runs)
    assert n and asked == [3]
    tuned(3)
    assert len(fake.runs) == n                      # the same bucket: shared
    tuned(2)
    assert len(fake.runs) > n                       # another bucket: tuned again
    buckets = sorted(json.loads((tune.tune_dir() / f).read_text())["rows_bucket"]
                     for f in tune_files())
    assert buckets == [2, 3]
    tune.clear_memory()                             # a new process reads either from disk
    n = len(fake.runs)
    tuned(2)
    tuned(3)
    assert len(fake.runs) == n
