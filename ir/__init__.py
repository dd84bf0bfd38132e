"""The IR: node types, canonicalising constructors, printer, and the analyses over it."""
