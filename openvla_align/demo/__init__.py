"""`openvla-align demo`: the paper's effect in miniature (see ``run``)."""

from .run import BANNER, DemoConfig, add_parser, run_demo

__all__ = ["BANNER", "DemoConfig", "add_parser", "run_demo"]
