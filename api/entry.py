"""Entry point of the `onnx-prune` command: signal handlers first, then the (slow) imports.

The package's `__init__` imports nothing heavy (its public names load on first use), so this module starts
at once; the CLI's imports (onnx, onnxruntime, numpy, scipy: about a second) come after the handlers, and a
Ctrl-C or SIGTERM in that second ends the command with one line, not a traceback.
"""
import signal
import sys

_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _stop(signum, frame):
    sys.stderr.write("onnx-prune: interrupted; nothing was written\n")
    sys.stderr.flush()
    raise SystemExit(_EXIT.get(signum, 130))


def main() -> int:
    for signum in _EXIT:
        signal.signal(signum, _stop)
    try:
        from onnx_prune.cli import main as run
    except SystemExit as stop:  # interrupted while importing
        return stop.code if isinstance(stop.code, int) else 130
    return run()  # installs its own handlers, which unwind through cleanup code


if __name__ == "__main__":
    sys.exit(main())
