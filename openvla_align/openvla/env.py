"""Version checks for the environment the stock OpenVLA scripts run in."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

from packaging.version import Version

from ..vla.families.openvla_oft import OFT_FORK_LLAMA_SHA256, STOCK_LLAMA_SHA256, llama_modeling_sha256

# OpenVLA's pinned stack; its HF modeling code checks timm and warns on transformers/tokenizers itself.
OPENVLA_PINS = {"torch": "2.2", "transformers": "4.40.1", "tokenizers": "0.19.1", "timm": "0.9.10", "peft": "0.11.1"}


def installed_versions() -> Dict[str, Optional[str]]:
    from .._plugins import installed_version

    return {name: installed_version(name) for name in OPENVLA_PINS}


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


# OpenVLA-OFT's transformers fork: its hashes live with the OFT model family (vla.families.openvla_oft)

_oft_attention_checked = False


def oft_attention_problem(digest: Optional[str] = None) -> Optional[str]:
    """One sentence when the installed transformers is not OpenVLA-OFT's fork (causal attention), else None."""
    digest = digest if digest is not None else llama_modeling_sha256()
    if digest == OFT_FORK_LLAMA_SHA256:
        return None
    which = "stock transformers 4.40.1" if digest == STOCK_LLAMA_SHA256 else "a transformers that is not OFT's fork"
    return (
        f"OpenVLA-OFT is running on {which}: its Llama attention is causal, so OFT's parallel decoding trains and "
        "predicts with the wrong mask (openvla-oft#135). Install the fork: pip install "
        "git+https://github.com/moojink/transformers-openvla-oft.git"
    )


def warn_oft_attention(digest: Optional[str] = None) -> Optional[str]:
    """Print the problem of ``oft_attention_problem`` once per process (at the OFT script's setup)."""
    global _oft_attention_checked
    problem = oft_attention_problem(digest)
    if problem and not _oft_attention_checked:
        print(f"[openvla-align] WARNING: {problem}")
    _oft_attention_checked = True
    return problem
