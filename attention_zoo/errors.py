"""The one exception family the CLI turns into a clean message and a non-zero exit, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, data path, checkpoint, arguments): the message says what to fix."""

    exit_code = 2


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: MemoryError, torch.OutOfMemoryError, or a RuntimeError whose
    message says it could not allocate (the CPU allocator's). Building a model tells such a failure by its size
    (config.build_model) rather than as a plug-in's or the zoo's error."""
    import torch  # here: this module is imported by the command line before torch is

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (isinstance(exc, RuntimeError)
                                                                      and "alloc" in str(exc).lower())
