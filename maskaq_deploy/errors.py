"""The root of every error the project raises, and the exit codes the command line ends with.

This module is a leaf: it imports nothing from the project, so it is the one module of the product package that
every layer may import (calib, export and runtimes import it and nothing else of maskaq_deploy's own modules).

Every typed error derives from ``MaskAQDeployError`` and carries on its class the exit code the CLI ends with
(``exit_code``). Its message is one line in library terms: what is wrong and the fix. A setting that fixes it is
named by its key in backquotes, e.g. "keep that layer in float with `keep_fp`" (the config field or keyword
argument a Python caller sets, with its table where that helps: `model.kwargs`); the CLI writes it as its flag
("--keep-fp", "--model-kwargs"). A message stored rather than raised (a report's reason) keeps the same form.

Exit codes: 0 ok; 1 a failure (a stage could not do its job); 2 a usage error (bad option, bad input file, a run
folder locked by another command); 3 the TensorRT engine could not be built on this machine (bundle written); 4 an
accuracy gate was breached; 130 interrupted (Ctrl-C).
"""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NO_ENGINE, EXIT_GATE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class MaskAQDeployError(Exception):
    """Root of the project's errors; ``exit_code`` says how the CLI ends when one reaches it."""

    exit_code = EXIT_FAILURE


class MaskAQError(MaskAQDeployError):
    """Base of the errors raised by the product layer (maskaq_deploy's own modules)."""


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


class Bf16BuildError(UsageError):
    """A build cannot check a bf16 graph (onnxruntime has no CPU kernel for bf16 Q/DQ); an export can write one."""


class NonFiniteError(MaskAQError):
    """A computed value (a quantizer scale, a logit) is NaN or infinite: the stage failed."""
