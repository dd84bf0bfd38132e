"""spattn: a compiler for attention sparsity patterns.

Write which query may see which key (``"causal & window(1024)"``); spattn proves
which tiles of the attention matrix are empty, full or partial and runs a
Triton kernel specialised for the pattern.

Every error spattn reports is a :class:`SpattnError`; its subclasses say what kind.
"""
from spattn.dsl.errors import (SpattnBackendError, SpattnCacheError,  # noqa: F401
                               SpattnConfigError, SpattnError, SpattnInputError,
                               SpattnNameError, SpattnParamError, SpattnSyntaxError,
                               SpattnTypeError, SpattnValueError, SpattnWarning,
                               SpattnLayoutWarning, SpattnEmptyPatternWarning,
                               SpattnDenseMaskWarning)
from spattn.functional import attention  # noqa: F401
from spattn.pattern import Pattern, compile, load, pattern_names  # noqa: F401
from spattn.neighborhood import neighborhood  # noqa: F401
from spattn import nn  # noqa: F401,E402  (spattn.nn.SparseAttention after `import spattn`)

__version__ = "0.1.0"

__all__ = ["Pattern", "SpattnError", "SpattnSyntaxError", "SpattnNameError", "SpattnTypeError",
           "SpattnValueError", "SpattnParamError", "SpattnInputError", "SpattnBackendError",
           "SpattnConfigError", "SpattnCacheError", "SpattnWarning", "SpattnLayoutWarning",
           "SpattnEmptyPatternWarning", "SpattnDenseMaskWarning", "compile", "load", "pattern_names",
           "attention", "neighborhood", "nn", "__version__"]
