"""An expectation independent of the analysis under test: how many channels of each fixture may be pruned, as
`models/fixtures/README.md` describes the fixture (summed over its groups).  The zero-channel oracle in
tests/invariants.py zeroes the channels the analysis itself calls prunable, so an analysis that froze too much
would still pass it; these counts would not."""
import pytest

from conftest import fixture_path
from onnx_prune.pipeline import prepare

# fixture -> prunable channel units, from the README's "expected channel analysis" column
PRUNABLE = {
    "residual_add": 8 + 8 + 16,       # {conv0, conv2} out, conv1 out, {conv3, conv4} out
    "external_data": 8 + 8 + 16,      # the same graph as residual_add
    "concat": 8 + 4 + 6 + 8,          # conv0, conv1, conv2 (offset into the concat), conv3
    "se": 16 + 4 + 8,                 # trunk tied through the gate, SE bottleneck, conv3
    "depthwise": 8 + 16 + 8,          # residual space, expand (through the depthwise conv), conv5
    "flatten_gemm": 4,                # conv0 out, block-mapped into fc
    "reshape_gemm": 4,
    "unknown_op": 8 + 8,              # conv0 and conv2; conv1 out is frozen by LRN
    "nhwc_transpose": 8 + 8,
    "constant_weights": 8 + 16,
    "grouped_conv": 4 + 4 + 8,        # group-balanced: 8 channels of a group=2 conv are 4 units of 2
    "shared_weight": 8 + 8 + 8,
    "resize_scales": 8 + 8,
    "resize_sizes": 8 + 8,            # sizes[1] is rewritten
    "opset21": 8 + 16,
    "if_subgraph": 8,                 # conv1 out; conv0 out is read inside the If's branches: frozen
    "loop_subgraph": 8,               # likewise for the Loop body
    "blazeface_block": 3 + 16,        # 24-ch trunk less 20 padding channels and one stem channel; conv7
    "paddle_se": 16 + 4 + 8,
    "tf_same_padding": 8 + 16,
    "pad_channel": 7,                 # 16-ch sum: the 8 zero-padded positions and one of conv0's are frozen
    "channel_shuffle": 5 + 4 + 4,     # trunk followed through the computed shuffle (3 frozen), both branches
}


@pytest.mark.parametrize("name", sorted(PRUNABLE))
def test_prunable_channels_match_the_fixture_description(name):
    analysis = prepare(fixture_path(name)).analysis
    assert sum(g.prunable for g in analysis.groups) == PRUNABLE[name]


def test_every_fixture_has_an_expectation():
    from conftest import FIXTURES

    assert {p.stem for p in FIXTURES.glob("*.onnx")} == set(PRUNABLE)
