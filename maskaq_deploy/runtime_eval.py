"""Run an exported artifact of a quantized checkpoint on a runtime, over an image set."""

from __future__ import annotations

from maskaq_deploy.errors import UsageError

RUNTIMES = ("torch",)


def run_artifact(runtime, run_dir, artifact, images, batch_size, manifest):
    raise UsageError(f"runtime {runtime!r} is not available; choose one of {', '.join(RUNTIMES)}")
