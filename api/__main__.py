import sys

from onnx_prune.cli import main

sys.exit(main())
