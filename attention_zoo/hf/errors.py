"""What the transformers interop raises, and the one place that imports transformers."""
from __future__ import annotations

from types import ModuleType

from ..errors import UserError


class ConversionError(UserError, ValueError):
    """A model or option the zoo cannot reproduce exactly (or a source it cannot read): the message names it.
    A UserError, so the CLI prints it and exits 2."""


def require_transformers() -> ModuleType:
    """The transformers module, or ConversionError saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ConversionError("this needs the optional dependency transformers: pip install 'attention-zoo[hf]' "
                              f"({exc})") from None
    return transformers
