"""The error every flag check raises, in a module of its own so that the flag modules (arguments,
megatron_flags, megatron_compat, model_flags) import it without importing each other."""

ERROR_PREFIX = "megaphi.pretrain: error:"  # the one prefix of the training command's errors


class ArgumentError(ValueError):
    """A flag (or a combination of flags) is invalid; the message names the flag."""


class FlagError(ArgumentError):
    """A flag check that fails before anything is read from disk (the command exits with status 2, as
    argparse does for a bad command line); ArgumentError otherwise exits with 1."""
