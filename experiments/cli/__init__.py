"""The `atlas-eqx` command line (also `python -m experiments`): the top of `experiments`."""

from ._main import build_parser as build_parser, main as main
