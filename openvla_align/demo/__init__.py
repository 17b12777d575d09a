"""`openvla-align demo`: the paper's effect in miniature (see ``run``)."""

from .run import BANNER, QUICK, DemoConfig, add_parser, run_demo

__all__ = ["BANNER", "QUICK", "DemoConfig", "add_parser", "run_demo"]
