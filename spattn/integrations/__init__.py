"""Adapters that run spattn inside other libraries.

Each adapter is a module of its own and imports its library only when it is imported:
``import spattn.integrations.transformers`` registers ``attn_implementation="spattn"`` with
Hugging Face transformers (the optional extra ``spattn[hf]``).
"""
