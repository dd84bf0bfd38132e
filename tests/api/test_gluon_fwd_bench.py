"""The Gluon forwards of ``benchmarks/gluon_fwd.py`` compiled for Hopper (sm_90a) without a
GPU (``--compile-only``): every configuration builds; the warp-specialised ones give their
consumer warp groups 240 registers and the loader 24 (``setmaxnreg``), and the forms that
overlap a product with the softmax keep one product in flight (``wgmma.wait_group 1``)
where ping-pong alone waits for every product. A Triton release that changes Gluon's
interface or what it emits fails here; the timings that rest on these forms are in
benchmarks/RESULTS.md ("FlashAttention-3's forward structure in Gluon")."""
import ast

from tests.helpers.uninterpreted import run_script


def test_gluon_forwards_compile_for_sm90():
    r = run_script("benchmarks/gluon_fwd.py", "--compile-only")
    facts = {}
    for ln in r.stdout.splitlines():
        label, ok, rest = ln.partition(" OK ")
        assert ok, (ln, r.stdout)
        facts[label.strip()] = ast.literal_eval(rest.strip())
    ws = [n for n in facts if n.startswith("ws")]
    assert len(ws) == 5 and len(facts) == 7, r.stdout
    for n in ws:
        assert {"240", "24"} <= set(facts[n]["setmaxnreg"]), (n, facts[n])
    for n in ("ws overlap", "ws ping-pong + overlap", "ws ping-pong + overlap, boxes 2x8x8",
              "one partition, overlap"):
        assert "1" in facts[n]["waits"], (n, facts[n])
    for n in ("ws ping-pong", "one partition"):
        assert facts[n]["waits"] == ["0"], (n, facts[n])
    assert facts["one partition"]["setmaxnreg"] == [], facts["one partition"]
