"""spattn: a compiler for attention sparsity patterns.

Write which query may see which key (``"causal & window(1024)"``); spattn proves
which tiles of the attention matrix are empty, full or partial and runs a
Triton kernel specialised for the pattern.

Every error spattn reports is a :class:`SpattnError`; its subclasses say what kind.
"""
from spattn.dsl.errors import (SpattnBackendError, SpattnCacheError,  # noqa: F401
                               SpattnConfigError, SpattnError, SpattnInputError,
                               SpattnNameError, SpattnParamError, SpattnSyntaxError,
                               SpattnTypeError, SpattnValueError)
from spattn.pattern import Pattern, compile, load, pattern_names  # noqa: F401

__version__ = "0.1.0"

__all__ = ["Pattern", "SpattnError", "SpattnSyntaxError", "SpattnNameError", "SpattnTypeError",
           "SpattnValueError", "SpattnParamError", "SpattnInputError", "SpattnBackendError",
           "SpattnConfigError", "SpattnCacheError", "compile", "load", "pattern_names",
           "attention", "__version__"]


def attention(q, k, v, *, pattern: str, scale=None, return_lse=False, q_offset=None, **kwargs):
    """Functional form: ``attention(q, k, v, pattern="causal & window(W)", W=1024, doc=doc)``.

    Keyword arguments that name runtime inputs of the pattern are passed at call
    time; the others bind params. Compiled patterns are cached.
    """
    from spattn.runtime.api import functional_attention
    return functional_attention(q, k, v, pattern=pattern, scale=scale, return_lse=return_lse,
                                q_offset=q_offset, **kwargs)
