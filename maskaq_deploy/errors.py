"""Errors of the product surface, and the exit codes the CLI maps every typed error to.

Exit codes: 0 ok; 1 a failure (a stage could not do its job); 2 a usage error (bad option, bad input file, a run
folder locked by another command); 3 the TensorRT engine could not be built on this machine (bundle written); 4 an
accuracy gate was breached; 130 interrupted (Ctrl-C).
"""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NO_ENGINE, EXIT_GATE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class MaskAQError(Exception):
    """Base of the errors raised by maskaq_deploy; ``exit_code`` says how the CLI ends."""

    exit_code = EXIT_FAILURE


class UsageError(MaskAQError):
    """The user asked for something that cannot be done as given (bad option value, bad input file)."""

    exit_code = EXIT_USAGE


class ModelError(UsageError):
    """Unknown model name, missing or mismatched checkpoint, unsupported architecture."""


class DataError(UsageError):
    """Validation or calibration data missing, malformed, or not fitting the model."""


class OutputExistsError(UsageError):
    """The output directory is not empty (pass --force to overwrite)."""


class RunLockedError(UsageError):
    """Another live process holds the run folder's lock."""


class ProvenanceError(UsageError):
    """Files of a run do not belong together (a checkpoint, its FP weights or an artifact changed since)."""


class NonFiniteError(MaskAQError):
    """A computed value (a quantizer scale, a logit) is NaN or infinite: the stage failed."""
