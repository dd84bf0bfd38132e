"""The command line on every example pattern: exit codes, outputs, PNGs."""
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spattn
from spattn.cli import demo_inputs, main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "patterns").glob("*.spattn"))
# every pattern of every file: (path, pattern name)
PATTERNS = [pytest.param(p, n, id=f"{p.stem}:{n}") for p in EXAMPLES for n in spattn.pattern_names(p)]


def _length(path, name, default):
    """The call length of a pattern: its grid's cell count when it is declared on one
    (a call of another length is refused), else ``default``."""
    pat = spattn.load(path, pattern=name)
    return default if pat.grid is None else \
        math.prod(pat.grid) + pat.grid_offset + pat.grid_suffix


def run(*argv):
    out = io.StringIO()
    code = main(list(map(str, argv)), out=out)
    return code, out.getvalue()


def test_examples_exist():
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_check_whole_file(path):
    code, text = run("check", path)
    assert code == 0
    names = spattn.pattern_names(path)
    lines = text.splitlines()
    if len(names) == 1:
        assert lines[0] == spattn.load(path).source
    else:
        heads = [line for line in lines if not line.startswith("  ")]
        assert len(heads) == len(names)
        for name, line in zip(names, heads):
            assert line == f"{name}: {spattn.load(path, pattern=name).source}"


def test_several_patterns_need_a_pick_exit_2(capsys):
    path = next(p for p in EXAMPLES if len(spattn.pattern_names(p)) > 1)
    code, _ = run("show", path, "--lq", 8)
    err = capsys.readouterr().err
    assert code == 2 and "--pattern" in err
    assert err.startswith("usage: spattn show ") and "spattn show: error:" in err


@pytest.mark.parametrize("pick", [False, True], ids=["whole-file", "one-pattern"])
def test_score_with_a_file_is_a_usage_error(pick, capsys):
    """``--score`` modifies ``-e EXPR``; with a file it is refused whether check lists the
    file's every pattern or one (it was dropped without a word for a whole file)."""
    path = next(p for p in EXAMPLES if len(spattn.pattern_names(p)) > 1)
    extra = ["--pattern", spattn.pattern_names(path)[0]] if pick else []
    code, _ = run("check", path, *extra, "--score", "softcap(3.0)")
    err = capsys.readouterr().err
    assert code == 2 and "usage: spattn check " in err and "--score goes with -e EXPR" in err


def test_a_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.spattn"
    path.write_bytes(b"\xef\xbb\xbfpattern p = causal & window(4)\n")
    code, text = run("check", path)
    assert code == 0 and text.splitlines()[0] == spattn.compile("causal & window(4)").source


@pytest.mark.parametrize("extra", [[], ["-p", "X=3"]], ids=["no-param", "unused-param"])
def test_an_unbound_name_says_which_option_binds_it(extra, capsys):
    code, _ = run("check", "-e", "window(W)", *extra)
    err = capsys.readouterr().err
    assert code == 1 and "unknown name 'W' (bind it with -p W=VALUE)" in err
    assert "compile(" not in err and ("-p X named no free name" in err) == bool(extra)


def test_warnings_are_the_commands_lines(capsys):
    """spattn's warnings print as ``spattn: warning: ...``, not in Python's form with a
    file and source line of spattn's."""
    code, text = run("check", "-e", "window(0)")
    err = capsys.readouterr().err
    assert code == 0 and text.strip() == "false"
    assert err.startswith("spattn: warning: pattern ") and "allows no" in err
    assert ".py:" not in err and "Warning" not in err


@pytest.mark.parametrize("path,name", PATTERNS)
def test_show_text_and_png(path, name, tmp_path):
    png = tmp_path / f"{name}.png"
    lq, lk = _length(path, name, 40), _length(path, name, 48)
    code, text = run("show", path, "--pattern", name, "--lq", lq, "--lk", lk, "--png", png)
    assert code == 0
    assert "tiles [" in text and (f"mask [{lq} x {lk}]" in text or lq > 64)  # large: tiles only
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("path,name", PATTERNS)
def test_explain(path, name):
    code, text = run("explain", path, "--pattern", name, "--lq", _length(path, name, 512),
                     "--heads", 2)
    assert code == 0
    assert "density" in text.lower() and "strategy" in text.lower()


@pytest.mark.parametrize("q_offset", [0, 50, 150])
def test_explain_at_a_query_offset(q_offset):
    """``--q-offset`` places the queries for explain as for show and run: the pairs it
    reports are the dense mask's at that offset, with the same synthetic inputs."""
    path = ROOT / "examples" / "patterns" / "packed_documents.spattn"
    code, text = run("explain", path, "--pattern", "packed_causal", "--lq", 100, "--lk", 300,
                     "--q-offset", q_offset)
    assert code == 0, text
    pat = spattn.load(path, pattern="packed_causal")
    inputs = demo_inputs(pat, 100, 300, q_offset=q_offset)[0]
    pairs = int(pat.mask(100, 300, q_offset=q_offset, **inputs).sum())
    assert f"({pairs:,} / 30,000;" in text


@pytest.mark.parametrize("path,name", PATTERNS)
def test_codegen(path, name, tmp_path):
    out = tmp_path / "kernel.py"
    code, _ = run("codegen", path, "--pattern", name, "-o", out)
    assert code == 0
    src = out.read_text()
    assert "@triton.jit" in src and spattn.load(path, pattern=name).source in src
    compile(src, str(out), "exec")


@pytest.mark.parametrize("path,name", PATTERNS)
def test_run_torch_backend(path, name):
    code, text = run("run", path, "--pattern", name, "--lq", _length(path, name, 48), "--heads",
                     2, "--dim", 16, "--backend", "torch", "--repeat", 1)
    assert code == 0, text
    assert "(ok)" in text


def test_inline_expression_and_params():
    code, text = run("check", "-e", "causal & window(W)", "-p", "W=8")
    assert code == 0 and text.splitlines() == [spattn.compile("window(8)").source, "params: W=8"]
    code, text = run("check", "-e", "causal & q - k < spans[h]", "-p", "spans=2,4")
    assert code == 0 and "[2, 4][h]" in text


def test_pattern_error_exit_1(capsys):
    code, _ = run("check", "-e", "causal & windw(8)")
    err = capsys.readouterr().err
    assert code == 1
    assert "line 1, column 10" in err and "^" in err and "window" in err


@pytest.mark.parametrize("argv", [
    ["check"],                                   # neither file nor -e
    ["check", "-e", "causal", "x.spattn"],       # both
    ["show", "-e", "causal"],                    # --lq missing
    ["show", "-e", "causal", "--lq", "-3"],      # bad size
    ["check", "-e", "causal", "-p", "W"],        # bad param syntax
    ["check", "-e", "causal", "-p", "=3"],       # no name
    ["frobnicate"],                              # unknown command
], ids=["no-source", "two-sources", "no-lq", "negative-lq", "bad-param", "param-no-name",
        "unknown-command"])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        code, _ = run(*argv)
        raise SystemExit(code)
    assert e.value.code == 2


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "spattn.cli", "explain", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--lq" in r.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"spattn {spattn.__version__} (codegen ")
    assert f"torch {torch.__version__}" in text


def test_check_lists_the_inputs_of_every_pattern():
    """A file of several patterns: each one's params and inputs below its line."""
    code, text = run("check", ROOT / "examples" / "patterns" / "minference_a_shape.spattn")
    assert code == 0
    assert text.splitlines() == [
        f"a_shape: {spattn.load(ROOT / 'examples/patterns/minference_a_shape.spattn', pattern='a_shape').source}",
        "  params: n_init=128, n_local=3968",
        f"vertical_slash: {spattn.load(ROOT / 'examples/patterns/minference_a_shape.spattn', pattern='vertical_slash').source}",
        "  params: n_init=128, n_local=3968",
        "  inputs: vertical (1-D), slash (1-D)"]


@pytest.mark.parametrize("dim, dtype, block_d, name", [
    (64, "float16", 64, "fp16"), (32, "float32", 32, "fp32"), (128, "bfloat16", 128, "bf16")],
    ids=["D64-fp16", "D32-fp32", "D128-bf16"])
def test_codegen_dim_and_dtype(dim, dtype, block_d, name):
    code, text = run("codegen", "-e", "causal & window(8)", "--dim", dim, "--dtype", dtype)
    assert code == 0
    assert f"BLOCK_D = {block_d}\n" in text and f"dtype={name}" in text
    assert text == spattn.compile("causal & window(8)").kernel_source(
        "fwd", head_dim=dim, dtype=getattr(torch, dtype))


def test_codegen_bad_dim_exit_1(capsys):
    code, _ = run("codegen", "-e", "causal", "--dim", 300)
    assert code == 1 and "head_dim must be an integer in 16..256" in capsys.readouterr().err


def test_show_draws_markers_as_markers():
    """``is_global[q] | is_global[k]`` marks whole rows and columns: a few, not every one
    (segment ids, which made the picture a solid square)."""
    path = ROOT / "examples" / "patterns" / "longformer.spattn"
    code, text = run("show", path, "--pattern", "longformer_marked", "-p", "W=4", "--lq", 32)
    assert code == 0 and "input is_global: synthetic 0/1 markers, shape (32,), 2 set" in text
    rows = [line.strip() for line in text.splitlines() if set(line.strip()) <= {"#", "."}
            and len(line.strip()) == 32]
    assert len(rows) == 32
    full_rows = [r for r in rows if r == "#" * 32]
    assert len(full_rows) == 2                # the two global rows, and nothing else full
    assert sum(r.count("#") for r in rows) < 32 * 32 // 2


def test_marker_inputs_are_the_inputs_compared_with_constants():
    from spattn.cli import marker_inputs
    pat = spattn.compile("input g\ninput doc\ninput blocks\npattern p = causal & (g[k] | "
                         "same(doc) | blocks[q // 8, k // 8] | doc[q] == 3)")
    assert marker_inputs(pat) == {"g"}


@pytest.mark.parametrize("name", ["picture.foo", "picture"], ids=["other-extension", "none"])
def test_png_is_written_where_asked_whatever_the_extension(name, tmp_path):
    """``--png PATH`` writes a PNG at PATH exactly (no extension added, none read)."""
    png = tmp_path / name
    code, text = run("show", "-e", "causal", "--lq", 16, "--png", png)
    assert code == 0 and f"wrote {png}" in text
    assert png.read_bytes()[:4] == b"\x89PNG" and sorted(tmp_path.iterdir()) == [png]


@pytest.mark.parametrize("argv", [["show", "-e", "causal", "--lq", 16, "--png", ""],
                                  ["codegen", "-e", "causal", "-o", " "]], ids=["png", "output"])
def test_an_empty_file_name_is_an_error_exit_1(argv, capsys):
    code, text = run(*argv)
    assert code == 1 and "needs a file name" in capsys.readouterr().err
    assert "wrote" not in text


def test_png_into_a_directory_is_an_error_exit_1(tmp_path, capsys):
    code, _ = run("show", "-e", "causal", "--lq", 16, "--png", tmp_path)
    assert code == 1 and f"cannot write {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,src", [("show", "same(doc)"), ("explain", "is_global[k] != 0")],
                         ids=["show-documents", "explain-markers"])
def test_synthetic_inputs_too_big_exit_1(cmd, src, capsys):
    """Runtime inputs made up for a length that does not fit in memory: the usual message,
    exit 1, no traceback."""
    code, _ = run(cmd, "-e", src, "--lq", 10 ** 15)      # (refused at once: no overcommit)
    err = capsys.readouterr().err
    assert code == 1 and "does not fit in memory" in err and "Traceback" not in err


def test_lengths_near_the_64_bit_limit_classify(capsys):
    """Tile grids whose padded end passes 2**63 - 1 (the tiles' ends clamped first)."""
    n = 2 ** 63 - 1
    tiles = spattn.compile("causal").tiles(n, n, 2 ** 62, 2 ** 62)
    assert tiles[0, 0].tolist() == [[1, 0], [2, 1]]
    code, text = run("show", "-e", "causal", "--lq", n, "--block-m", 2 ** 62, "--block-n", 2 ** 62)
    assert code == 0 and "tiles: 1 full, 2 partial, 1 empty" in text, capsys.readouterr().err


def test_run_refuses_inputs_larger_than_the_memory(monkeypatch, capsys):
    """``run`` checks the room for its random q, k, v before drawing them: on Linux a huge
    allocation is granted and the process killed while it writes it."""
    import spattn.ir.memory as memory
    assert memory.available_memory("cpu") > 0
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 ** 20)
    code, _ = run("run", "-e", "causal", "--lq", 64, "--lk", 4096, "--heads", 4, "--dim", 64)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "random q, k, v of 1 x 4 x 4096 x 64 does not fit in memory: it needs" in err
    assert "0.0 GiB available" in err
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # (not known)
    code, text = run("run", "-e", "causal", "--lq", 32, "--heads", 1, "--dim", 16,
                     "--repeat", 1)
    assert code == 0 and "(ok)" in text, text
