"""The exceptions msbnb_pass raises for bad input: one hierarchy under ``MsbnbError``.

``MsbnbError`` derives from ``ValueError``, so code written against the earlier ``ValueError``s keeps
working. Every message names the argument, file (with its line for TOML and regex errors) or layer, the
value it got and what is accepted. This module imports nothing, so every other module can use it.

* ``RuleError``        a rule, rule file or rule set is malformed
* ``MatchConflict``    two rules of equal priority match one layer
* ``RewriteError``     a rewrite failed; the network was restored
* ``PassError``        the pass could not run (bad arguments, sample inputs the network rejects)
* ``CheckpointError``  a state dict or checkpoint does not fit the layer (names the tensor);
                       ``CheckpointKeyError`` (also a KeyError) when a tensor is missing
* ``ConfigError``      a quantization config is invalid (unknown or misspelt arguments)
* ``QuantizationError`` values that cannot be quantized (NaN/Inf, beyond the float32 range)
* ``CLIError``         a command-line argument is unusable (output paths, shapes)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MsbnbError(ValueError):
    """Base of every error msbnb_pass raises for bad input."""


class RuleError(MsbnbError):
    """A rule file or rule is malformed (the message names the file, line, rule and key)."""


class MatchConflict(MsbnbError):
    """Two rules of equal priority both match one layer."""


class RewriteError(MsbnbError):
    """A rewrite failed; the network has been restored to its state before the pass."""


class PassError(MsbnbError):
    """The pass could not run; the network is untouched."""


class CheckpointError(MsbnbError):
    """A state dict or checkpoint does not fit: the message names the tensor, what it holds and what is needed."""


class CheckpointKeyError(CheckpointError, KeyError):
    """A state dict lacks a tensor (also a KeyError, as a missing key always was)."""

    __str__ = BaseException.__str__  # KeyError would quote the message


class ConfigError(MsbnbError):
    """A quantization config is invalid."""


class QuantizationError(MsbnbError):
    """Values that cannot be quantized: NaN/Inf, or float64 values beyond the float32 range."""


class CLIError(MsbnbError):
    """A command-line argument is unusable."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``name`` (difflib ratio >= 0.6), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or an empty string."""
    best = closest(name, candidates, n=1)
    return f"; did you mean {best[0]!r}?" if best else ""
