#!/usr/bin/env bash
# Setup on a lent GPU machine (no network): the carried wheels (lark) into /tmp/site and
# spattn itself as an editable install. Source it from the repository root, then run
# python3 as usual. Carry: .whl (lark, from `python3 -m pip download`) and, for
# benchmarks/ab.py, .out/base_pkg (`benchmarks/ab.py --make-base COMMIT`).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 SPATTN_CACHE_DIR=/tmp/spattn-cache
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e .
