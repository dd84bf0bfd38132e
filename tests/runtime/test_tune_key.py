"""The autotuner's row bucket (runtime.tables.Analysis.row_span, row_bucket): what separates
tuning choices by document count and row length, computed the same way in every process."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import spattn
from spattn.codegen.config import get_closed_form
from spattn.runtime import triton_backend, tune
from spattn.runtime.plan import Call
from spattn.runtime.tables import Analysis, row_bucket, union_count

DOCS = spattn.compile("causal & same(doc)")


def doc_ids(N, n, seed=0):
    """Document ids of ``n`` documents in ``N`` tokens, cut at sorted random positions."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: n - 1] + 1).values
    return torch.bucketize(torch.arange(N), cuts, right=True)


def doc_call(N, n, seed=0, H=2):
    q = torch.empty(1, H, N, 16)
    return Call.of(DOCS, q, q, scale=1.0, q_offset=None, inputs={"doc": doc_ids(N, n, seed)})


@pytest.mark.parametrize("tiles, rows, bucket", [
    (0, 0, -1), (5, 5, 0), (7, 4, 0), (8, 4, 1), (2080, 64, 5), (32896, 256, 7),
    (2 ** 40 - 1, 1, 39), (2 ** 40, 1, 40)])
def test_row_bucket_is_floor_log2_of_the_mean(tiles, rows, bucket):
    assert row_bucket(tiles, rows) == bucket


@pytest.mark.parametrize("src", ["causal", "causal & window(256)", "chunked(512) & causal",
                                 "causal & (q - k < 128 * (h + 1))", "full",
                                 "causal & (window(20) | sink(4))",
                                 "global_tokens(16) | local(100, 100)"])
@pytest.mark.parametrize("Lq, Lk, q_offset", [(1000, 1000, None), (777, 1077, 300)],
                         ids=["L1000", "L777-offset300"])
def test_closed_form_and_tile_classes_agree(src, Lq, Lk, q_offset):
    """The host count from the closed form is the count of non-EMPTY tiles of the
    classification (per-head patterns over all heads)."""
    pat = spattn.compile(src)
    host = Analysis(pat, Lq, Lk, B=1, H=4, q_offset=q_offset)
    dev = Analysis(pat, Lq, Lk, B=1, H=4, q_offset=q_offset)
    tiles, rows = dev.row_span()
    assert host.row_span(get_closed_form(pat)) == (tiles, rows)
    assert dev.fine                                  # classified (the tables reuse it)
    assert not host.fine                             # no classification on the host path
    # every row of these patterns reaches at least one key
    assert rows == (4 if "(h + 1)" in src else 1) * -(-Lq // 64)


_TEMPLATES = ["causal & window({a})", "chunked({a}) & causal", "causal & (window({a}) | sink({b}))",
              "global_tokens({b}) | local({a}, {b})", "q - k >= {b} & q - k < {a} + {b}",
              "causal & (q - k < {a} * (h + 1))", "dilated({a}, {c})"]
_COMPILED = {}


@given(t=st.sampled_from(_TEMPLATES), a=st.integers(1, 300), b=st.integers(1, 70),
       c=st.integers(1, 4), Lq=st.integers(1, 400), extra=st.integers(0, 300),
       offset=st.booleans(), H=st.integers(1, 3))
def test_closed_form_counts_match_classes_property(t, a, b, c, Lq, extra, offset, H):
    """Random windows, chunks, unions, lengths and offsets: the host count of the closed
    form and the count of the classes agree (or the pattern has no closed form)."""
    src = t.format(a=a, b=b, c=c)
    pat = _COMPILED.get(src) or _COMPILED.setdefault(src, spattn.compile(src))
    cf = get_closed_form(pat)
    if cf is None:
        return
    Lk = Lq + extra if offset else max(1, Lq - extra // 2)
    q_offset = extra if offset else None
    host = Analysis(pat, Lq, Lk, B=1, H=H, q_offset=q_offset).row_span(cf)
    dev = Analysis(pat, Lq, Lk, B=1, H=H, q_offset=q_offset).row_span()
    assert host == dev, (src, Lq, Lk, q_offset, H)


@pytest.mark.parametrize("seed", range(3))
def test_union_count_against_sets(seed):
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 30, (4, 50), generator=g)
    hi = lo + torch.randint(-5, 12, (4, 50), generator=g)      # some empty (hi < lo)
    want = [len({x for k in range(4) for x in range(int(lo[k, j]), int(hi[k, j]) + 1)})
            for j in range(50)]
    assert union_count(lo, hi).tolist() == want
    assert union_count(lo[:0], hi[:0]).tolist() == [0] * 50


def test_document_counts_get_their_own_buckets():
    N = 4096
    buckets = {n: triton_backend.rows_bucket(doc_call(N, n)) for n in (1, 4, 20, 100)}
    assert buckets[1] == row_bucket(64 * 65 // 2, 64) == 5     # causal: 32.5 tiles a row
    assert buckets[1] > buckets[4] > buckets[20] > buckets[100]
    # another draw of the cuts with the same count: the same bucket
    assert triton_backend.rows_bucket(doc_call(N, 20, seed=3)) == buckets[20]
    # fully masked rows do not count (a query row before every key of its document is not
    # possible here; a pattern that masks whole rows: queries below 256 see nothing)
    pat = spattn.compile("causal & q >= 256")
    a = Analysis(pat, 1024, 1024, B=1, H=1)
    assert a.row_span(get_closed_form(pat))[1] == 12


_CHILD = """
import json, torch, spattn
from spattn.runtime import triton_backend, tune
from tests.runtime.test_tune_key import doc_call, DOCS
call = doc_call(4096, 20)
rows = triton_backend.rows_bucket(call)
f = tune.key_fields(DOCS, "fwd", head_dim=128, dtype=torch.bfloat16,
                    device=torch.device("cuda", 0), Lq=4096, Lk=4096, strategy="table",
                    BH=16, rows=rows)
print(json.dumps([rows, tune.tune_key(f)]))
"""


def test_key_is_the_same_in_another_process():
    """No id(), no hash randomisation: a process with another hash seed computes the same
    bucket and the same key."""
    rows = triton_backend.rows_bucket(doc_call(4096, 20))
    f = tune.key_fields(DOCS, "fwd", head_dim=128, dtype=torch.bfloat16,
                        device=torch.device("cuda", 0), Lq=4096, Lk=4096, strategy="table",
                        BH=16, rows=rows)
    assert f["rows_bucket"] == rows
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=root, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [rows, tune.tune_key(f)]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 20, 1000])
def test_row_span_on_cuda_matches_the_cpu(n):
    """The device classification (spans kernels, pooling on CUDA) counts what the CPU's
    does, so a GPU process keys its choices by the bucket the tests check here."""
    N = 16384
    cpu = doc_call(N, n)
    q = torch.empty(1, 2, N, 16, device="cuda")
    gpu = Call.of(DOCS, q, q, scale=1.0, q_offset=None,
                  inputs={"doc": doc_ids(N, n).cuda()})
    assert gpu.analysis.row_span() == cpu.analysis.row_span()
    assert triton_backend.rows_bucket(gpu) == triton_backend.rows_bucket(cpu)
