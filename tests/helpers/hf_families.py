"""Every causal-LM family of the installed transformers, once, through ``"spattn"``.

Each family is built from one generic small config (``AutoConfig.for_model`` with the
fields below that its config has; no download) and run on a left-padded batch, once with
SDPA (or eager, where the model has no SDPA path) and once with
``attn_implementation="spattn"``: the logits at the real tokens (relative error) and 6
greedy tokens are compared. A family runs in a process of its own (a model that fails to
build, runs out of memory or time does not stop the others). One line per family:

    OK    sdpa err=...       matched (error <= 1e-4, the same tokens)
    BAD   sdpa err=...       ran, but differed
    FAIL  spattn ...         spattn refused or failed (the error's first line)
    FAIL  sdpa ...           the reference itself failed with the generic config
    SKIP  ...                not built from the generic config, or no attention backend
    LOST  ...                the process died (memory) or ran past --seconds

    python -m tests.helpers.hf_families [--only llama,gemma2] [--seconds 150] [--stray]
        [--long]

``--stray``: every field of the generic config is passed to every family, whether or not
its config has it (``sliding_window`` on a Llama, as configs copied from another model
carry): a field the model's code never reads must change nothing.

``--long``: prompts of 300 tokens (rows 0 and 2 left-padded by 40 and 7) instead of 9, so
that the generated tokens' attention takes the decode path (256 keys or more), where the
layers after a forward's first repeat its kernel call (docs/integrations.md).

``--encoders``: the base-model families that are not causal LMs (``AutoModel``: encoders,
embedding models; vision and audio models fail their reference without text inputs, and
are reported so), each on a right-padded batch: the last hidden state at the real tokens.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import warnings

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, head_dim=16, max_position_embeddings=512,
             sliding_window=5, n_layer=3, n_head=4, n_embd=64, d_model=64, num_layers=3,
             num_heads=4, ffn_dim=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False, use_cache=True)
TOL = 1e-4


def _family(model_type: str, auto_class: str, stray: bool = False):
    """``(model, reference attn_implementation)`` of one family built from the generic small
    config through ``transformers.<auto_class>`` (SDPA, or eager where the model has no SDPA
    path), in eval mode; or the line of a family that cannot be run, as a str."""
    import torch
    import spattn.integrations.transformers  # noqa: F401  (registers "spattn")
    import transformers
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    auto, AutoConfig = getattr(transformers, auto_class), transformers.AutoConfig
    try:
        base = AutoConfig.for_model(model_type)
        kw = {k: v for k, v in SMALL.items()
              if stray or hasattr(base, k) or k == "pad_token_id"}
        if getattr(base, "sliding_window", None) is None and not stray:
            kw.pop("sliding_window", None)
        cfg = AutoConfig.for_model(model_type, **kw)
        types = getattr(cfg, "layer_types", None)
        if types is not None and len(types) != getattr(cfg, "num_hidden_layers", len(types)):
            cfg.layer_types = (list(types) * 3)[:cfg.num_hidden_layers]
        ref = "sdpa"
        torch.manual_seed(0)
        try:
            model = auto.from_config(cfg, attn_implementation="sdpa")
        except ValueError:
            ref = "eager"
            torch.manual_seed(0)
            model = auto.from_config(cfg, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001  (any failure to build is a skip)
        return f"SKIP  build {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    if not getattr(model, "_supports_attention_backend", False):
        return "SKIP  no attention backend"
    return model.eval(), ref


def _outputs(model, ref: str, run):
    """``{implementation: run(model)}`` for the reference and ``"spattn"``, without
    gradients; or the FAIL line of the first that raises."""
    import torch
    res = {}
    for impl in (ref, "spattn"):
        try:
            model.set_attn_implementation(impl)
            with torch.no_grad():
                res[impl] = run(model)
        except Exception as e:  # noqa: BLE001
            return f"FAIL  {impl} {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def _batch(padding: tuple[slice, slice], length: int = 9):
    """``input_ids, attention_mask [3, length]``: random tokens, rows 0 and 2 padded where
    ``padding`` says (left padding for generation, right padding for encoders)."""
    import torch
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, length))
    am = torch.ones_like(ids)
    am[0, padding[0]] = 0
    am[2, padding[1]] = 0
    return ids, am


def _rel_err(a, b, am) -> float:
    """max |a - b| / max |a| over the real tokens of ``am``."""
    keep = am.bool()[..., None]
    a, b = a.masked_fill(~keep, 0), b.masked_fill(~keep, 0)
    return float((a - b).abs().max() / a.abs().max())


def one(model_type: str, stray: bool = False, long: bool = False) -> str:
    """The line of one family (run in this process)."""
    import torch
    built = _family(model_type, "AutoModelForCausalLM", stray)
    if isinstance(built, str):
        return built
    model, ref = built
    ids, am = _batch((slice(None, 40), slice(None, 7)), 300) if long else \
        _batch((slice(None, 4), slice(None, 1)))
    res = _outputs(model, ref, lambda m: (
        m(input_ids=ids, attention_mask=am).logits,
        m.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)))
    if isinstance(res, str):
        return res
    (a, ta), (b, tb) = res[ref], res["spattn"]
    err = _rel_err(a, b, am)
    ok = err <= TOL and torch.equal(ta, tb)
    return f"{'OK  ' if ok else 'BAD '}  {ref} err={err:.2e} same_tokens={torch.equal(ta, tb)}"


def one_encoder(model_type: str, stray: bool = False) -> str:
    """The line of one base-model family (``AutoModel``, not a causal LM: encoders and
    embedding models), run in this process: the last hidden state at the real tokens of a
    right-padded batch, through its reference and through ``"spattn"``."""
    built = _family(model_type, "AutoModel", stray)
    if isinstance(built, str):
        return built
    model, ref = built
    ids, am = _batch((slice(5, None), slice(8, None)))

    def hidden(m):
        out = m(input_ids=ids, attention_mask=am)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    res = _outputs(model, ref, hidden)
    if isinstance(res, str):
        return res
    a, b = res[ref], res["spattn"]
    if a.shape[:2] != am.shape:
        return f"SKIP  output of shape {tuple(a.shape)}, not per token"
    err = _rel_err(a, b, am)
    return f"{'OK  ' if err <= TOL else 'BAD '}  {ref} err={err:.2e}"


def _text_model(model_type: str) -> bool:
    """The family's config has a ``vocab_size`` at its top (vision and audio models, and
    models that nest their text config, do not: they need other inputs)."""
    from transformers import AutoConfig, logging
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    try:
        return hasattr(AutoConfig.for_model(model_type), "vocab_size")
    except Exception:  # noqa: BLE001  (the family's own process reports it)
        return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated model types")
    ap.add_argument("--seconds", type=float, default=150.0, help="per family")
    ap.add_argument("--encoders", action="store_true",
                    help="the base-model families that are not causal LMs (AutoModel)")
    ap.add_argument("--stray", action="store_true",
                    help="every generic field on every config, read by the model or not")
    ap.add_argument("--long", action="store_true",
                    help="prompts of 300 tokens: generation on the decode path")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(one_encoder(args.one, args.stray) if args.encoders
              else one(args.one, args.stray, args.long), flush=True)
        return
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_MAPPING_NAMES)
    if args.only:
        names = args.only.split(",")
    elif args.encoders:
        names = sorted(set(MODEL_MAPPING_NAMES) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    else:
        names = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for name in names:
        if args.encoders and not _text_model(name):
            print(f"{name:26s} SKIP  not a text model (its config has no vocab_size)",
                  flush=True)
            continue
        try:
            done = subprocess.run([sys.executable, "-m", "tests.helpers.hf_families", "--one",
                                   name, *(["--encoders"] if args.encoders else []),
                                   *(["--stray"] if args.stray else []),
                                   *(["--long"] if args.long else [])],
                                  capture_output=True, text=True, timeout=args.seconds)
            lines = [ln for ln in done.stdout.splitlines()
                     if ln.startswith(("OK", "BAD", "FAIL", "SKIP"))]
            line = lines[-1] if lines else f"LOST  exit {done.returncode}"
        except subprocess.TimeoutExpired:
            line = f"LOST  past {args.seconds:.0f} s"
        print(f"{name:26s} {line}", flush=True)


if __name__ == "__main__":
    main()
