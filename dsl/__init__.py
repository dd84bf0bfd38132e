"""The pattern language: grammar, parser, name resolution, prelude, errors."""
