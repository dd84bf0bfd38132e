"""The driver the random searches share (``adversarial``, ``adversarial2``, ``adversarial3``,
``gpu_fuzz``): draw a seed per case, run the kinds in turn until the time is up, report
every failure with its ``KIND:SEED`` and go on, or replay one case with ``--case``.

A search module keeps its cases (``kind -> case(seed) -> description``) and a ``last``
dict whose ``"desc"`` a case fills as it goes, so that a failure shows how far it got. What
differs between the searches is passed as a :class:`Hooks`.
"""
from __future__ import annotations

import argparse
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Hooks:
    """What one search adds to the shared loop.

    ``extra()`` is appended to every report line (what the case built); ``begin()`` runs
    before each case; ``passed(kind, desc)`` after each passing case; ``summary(kinds)``
    after the last; an exception in ``skip`` skips its case (a limit of the harness, not
    of the library) after ``on_skip()``; a failure for which ``fatal(e)`` is true ends the
    search (a lost CUDA context).
    """
    extra: Callable[[], str] = lambda: ""
    begin: Callable[[], None] = lambda: None
    passed: Callable[[str, str], None] = lambda kind, desc: None
    summary: Callable[[list], None] = lambda kinds: None
    skip: tuple = field(default_factory=tuple)
    on_skip: Callable[[], None] = lambda: None
    fatal: Callable[[Exception], bool] = lambda e: False


def parser(doc: str, kinds: dict) -> argparse.ArgumentParser:
    """The arguments every search takes; a search adds its own before parsing."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(kinds))
    ap.add_argument("--case", help="replay one case, KIND:SEED")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _line(last: dict, hooks: Hooks) -> str:
    return " ".join(x for x in (last["desc"], hooks.extra()) if x)


def run(args: argparse.Namespace, kinds: dict, last: dict, hooks: Hooks | None = None) -> int:
    """Replay ``args.case``, or search for ``args.minutes``; returns the number of failures."""
    hooks = hooks or Hooks()
    if args.case:
        kind, seed = args.case.split(":")
        hooks.begin()
        try:
            print(kinds[kind](int(seed)))
        finally:
            print(_line(last, hooks))
        return 0
    names = args.kinds.split(",")
    end = time.time() + args.minutes * 60
    n = fails = 0
    rng = random.Random(args.seed)
    while time.time() < end:
        kind = names[n % len(names)]
        seed = rng.randrange(2 ** 31)
        n += 1
        last["desc"] = ""
        hooks.begin()
        t0 = time.time()
        try:
            desc = kinds[kind](seed)
            hooks.passed(kind, desc)
            if args.verbose:
                print(f"ok   {time.time() - t0:5.1f}s {' '.join(x for x in (desc, hooks.extra()) if x)}",
                      flush=True)
        except hooks.skip as e:
            print(f"skip {kind}:{seed} ({type(e).__name__})", flush=True)
            hooks.on_skip()
        except Exception as e:  # noqa: BLE001 -- every failure is reported, the search goes on
            fails += 1
            print(f"FAIL {kind}:{seed}: {type(e).__name__}: {str(e)[:600]}\n     {_line(last, hooks)}",
                  flush=True)
            if not isinstance(e, AssertionError):
                traceback.print_exc()
            if hooks.fatal(e):
                print("the search stops (the device's state is lost)", flush=True)
                break
    print(f"{n} cases, {fails} failures")
    hooks.summary(names)
    return fails
