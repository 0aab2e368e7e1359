"""Entry point of the `onnx-prune` command: signal handlers first, then the (slow) imports.

A separate top-level module because importing anything inside the `onnx_prune` package first imports the
package (onnx, onnxruntime, numpy, scipy: about a second); a Ctrl-C or SIGTERM in that second must end the
command with one line, not a traceback.
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
