"""Version checks for the environment the stock OpenVLA scripts run in."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

from packaging.version import Version

# OpenVLA's pinned stack; its HF modeling code checks timm and warns on transformers/tokenizers itself.
OPENVLA_PINS = {"torch": "2.2", "transformers": "4.40.1", "tokenizers": "0.19.1", "timm": "0.9.10", "peft": "0.11.1"}


def installed_versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out: Dict[str, Optional[str]] = {}
    for name in OPENVLA_PINS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment_problems(versions: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
    """Known ways an environment breaks the stock OpenVLA fine-tuning script, one sentence each."""
    v = versions if versions is not None else installed_versions()
    problems = []
    tf = v.get("transformers")
    if tf and Version(tf) >= Version("4.50"):
        problems.append(
            f"transformers {tf}: OpenVLA's remote modeling code was written for 4.40.1; from 4.50 on the "
            "multimodal forward can silently run without the image. Use transformers==4.40.1 tokenizers==0.19.1."
        )
    timm = v.get("timm")
    if timm and not Version("0.9.10") <= Version(timm) < Version("1.0"):
        problems.append(
            f"timm {timm}: OpenVLA's modeling code refuses timm outside 0.9.10-0.9.16 (pip install timm==0.9.10)."
        )
    return problems


def warn_if_broken(versions: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
    problems = environment_problems(versions)
    for problem in problems:
        warnings.warn(f"openvla-align: this environment breaks OpenVLA fine-tuning: {problem}", stacklevel=2)
    return problems
