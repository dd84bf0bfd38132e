"""A launch configuration that does not fit the device's shared memory (runtime/triton_backend
``_fitted``): a default one is replaced (fewer stages, then halved tiles), one the caller
fixed is a SpattnConfigError. The compile is faked: the CPU has no shared-memory limit."""
import dataclasses

import pytest
import torch
from triton.runtime.errors import OutOfResources, PTXASError

import spattn
from spattn.codegen.config import default_tiles
from spattn.dsl.errors import SpattnConfigError
from spattn.runtime import settings as S
from spattn.runtime import triton_backend as TB


_Q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)


class _Call:
    """What ``_fitted`` reads of a call: its pattern, device and settings (as on a GPU)."""

    def __init__(self, env=None, monkeypatch=None):
        self.pattern = spattn.compile("causal & window(64)")
        self.device = torch.device("cuda")
        if env:
            for k, v in env.items():
                monkeypatch.setenv(k, v)
        self.settings = dataclasses.replace(S.current(), interpret=False)


def _shared_memory():
    return OutOfResources(1 << 18, 232448, "shared memory")


_PTX = "\n".join(f"\tld.global.b16 {{ %rs{i} }}, [ %rd{i} + 0 ];" for i in range(400))


def _assembler():
    """ptxas's SIGSEGV as Triton 3.6 raises it (ptxas 12.8 dies on some forward kernels at
    three stages), after printing the whole PTX on stdout as Triton does."""
    error = "`ptxas` failed with error code -11\n`ptxas` stderr:\n\nRepro command: ptxas ..."
    print(f"\n\n{'=' * 64}\n{error}\n\n{_PTX}\n{'=' * 64}\n"
          "please share the reproducer above with Triton project.\n")
    return PTXASError(error)


def _device(limit_stages, limit_n=256, error=_shared_memory):
    """A fake compile: fits only at most ``limit_stages`` stages and key tiles <= limit_n,
    else raises ``error()``."""
    tried = []

    def build(call, kind):
        def run(opts, warmup):
            cfg = TB._load(call, kind, 64, torch.bfloat16, opts)[1]
            tried.append((cfg.block_m, cfg.block_n, cfg.num_stages))
            assert warmup, "the fit is checked by compiling before the first launch"
            if cfg.num_stages > limit_stages or cfg.block_n > limit_n:
                raise error()
            return cfg
        return run
    return build, tried


BM, BN, _, STAGES = default_tiles(64, "bf16")       # the GPU's forward default at D = 64


@pytest.mark.parametrize("limit_stages, limit_n, want", [
    (STAGES, 128, (BM, BN, STAGES)), (STAGES - 1, 128, (BM, BN, STAGES - 1)),
    (2, BN // 2, (BM, BN // 2, 2)),
    ], ids=["fits", "one-stage-fewer", "tiles-halved"])
def test_default_configuration_is_fitted(limit_stages, limit_n, want):
    call = _Call()
    build, tried = _device(limit_stages, limit_n)
    cfg = TB._fitted(call, "fwd", _Q, {}, explicit={},
                     build=build(call, "fwd"))
    assert (cfg.block_m, cfg.block_n, cfg.num_stages) == want
    assert tried[-1] == want and len(tried) == len(set(tried))


def test_fixed_configuration_is_a_config_error(monkeypatch):
    call = _Call({"SPATTN_FWD_STAGES": "3"}, monkeypatch)
    build, _ = _device(2, 128)
    with pytest.raises(SpattnConfigError, match=r"does not fit this device .*3 stages.*num_stages"):
        TB._fitted(call, "fwd", _Q, {}, explicit={}, build=build(call, "fwd"))
    call = _Call()
    with pytest.raises(SpattnConfigError, match="block_n set"):
        TB._fitted(call, "fwd", _Q, {"block_n": 128},
                   explicit={"block_n": 128}, build=build(call, "fwd"))


def test_nothing_fits_is_a_config_error():
    call = _Call()
    build, tried = _device(0, 128)
    with pytest.raises(SpattnConfigError, match="no configuration of the bwd kernel fits"):
        TB._fitted(call, "bwd", _Q, {}, explicit={},
                   build=build(call, "bwd"))
    assert tried[-1][:2] == (16, 16)


def test_off_cuda_the_stage_is_built_as_asked():
    call = _Call()
    call.device = torch.device("cpu")
    got = TB._fitted(call, "fwd", _Q, {}, explicit={},
                     build=lambda opts, warmup: (opts, warmup))
    assert got == ({}, False)


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_a_configuration_the_assembler_fails_on_is_stepped_down(kind, capsys, caplog):
    call = _Call()
    build, tried = _device(1, error=_assembler)
    with caplog.at_level("DEBUG", logger="spattn"):
        cfg = TB._fitted(call, kind, _Q, {}, explicit={}, build=build(call, kind))
    assert cfg.num_stages == 1 and tried[-1][2] == 1 and len(tried) > 1
    # Triton's print of the PTX is about a configuration the user never gets: the log's
    assert capsys.readouterr().out == ""
    assert "ld.global.b16 { %rs399 }" in caplog.text


def test_assembler_quiet_keeps_what_else_is_printed(capsys):
    with TB.assembler_quiet():
        print("before")
        _assembler()
        print("after")
    assert capsys.readouterr().out == "before\nafter\n"
    with pytest.raises(ValueError), TB.assembler_quiet():
        print("kept when the block raises")
        raise ValueError
    assert capsys.readouterr().out == "kept when the block raises\n"


def test_a_fixed_configuration_the_assembler_fails_on_is_a_config_error(monkeypatch):
    call = _Call({"SPATTN_FWD_STAGES": "3"}, monkeypatch)
    build, _ = _device(2, error=_assembler)
    with pytest.raises(SpattnConfigError, match=r"3 stages.*ptxas.*error code -11"):
        TB._fitted(call, "fwd", _Q, {}, explicit={}, build=build(call, "fwd"))


def test_other_errors_are_not_stepped_down():
    call = _Call()
    tried = []

    def build(opts, warmup):
        tried.append(opts)
        raise RuntimeError("not a refusal of the configuration")
    with pytest.raises(RuntimeError, match="not a refusal"):
        TB._fitted(call, "fwd", _Q, {}, explicit={}, build=build)
    assert len(tried) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [1708318959, 1939792207], ids=["D48-bf16-fwd", "D256-fp16-fwd-bwd"])
def test_kernels_the_assembler_fails_on_run_stepped_down(seed, monkeypatch, capsys, caplog):
    """The GPU random search's two calls whose default forward ptxas 12.8 (Triton 3.6's)
    dies on: they run at fewer stages, match the float64 reference in every output element
    and gradient (``gpu_fuzz.call_case`` raises otherwise), and print none of the PTX."""
    from tests.helpers.gpu_fuzz import call_case
    monkeypatch.setenv("SPATTN_AUTOTUNE", "0")
    with caplog.at_level("INFO", logger="spattn"):
        call_case(seed)
    out = capsys.readouterr().out
    assert "please share the reproducer" not in out and ".target sm_" not in out
    print("stepped down:", [r.getMessage()[:160] for r in caplog.records
                            if "assembler" in r.getMessage()])
