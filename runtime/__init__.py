"""Compile cache, kernel launch, autograd, torch backend."""
