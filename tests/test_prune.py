"""Pruning: the compact network computes what the masked student computes, with the dead units gone."""

from __future__ import annotations

import pytest
import torch

from varstudent.nn.architectures import build_model, build_spec, weight_count
from varstudent.nn.variational import variational_layers
from varstudent.prune import compact, layer_table, nonzero_weights


def set_keep(layer, keep: torch.Tensor) -> None:
    """Make exactly `keep` survive: log alpha = -5 where kept, +5 (>= threshold 3) elsewhere."""
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(layer.weight ** 2 + 1e-8) + torch.where(keep, -5.0, 5.0))


def randomly_sparse(net, density: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in variational_layers(net):
        set_keep(layer, torch.rand(layer.weight.shape, generator=gen) < density)


def assert_same_function(net, small, x) -> None:
    net.eval()
    small.eval()
    torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.02, 0.2, 1.0])  # 1.0: a layer with no zeros at all
def test_compact_mlp_matches_masked(density: float) -> None:
    net = build_model(build_spec("mlp-40-20", (1, 8, 8), 10, variational=True))
    randomly_sparse(net, density)
    small = compact(net)
    assert_same_function(net, small, torch.rand(32, 1, 8, 8))
    assert not small.spec["variational"]
    if density < 1:
        assert weight_count(small.spec) < weight_count(net.spec)


def test_compact_conv_nets_match_masked() -> None:
    lenet = build_model(build_spec("lenet5", (1, 28, 28), 10, width=0.3, variational=True))
    randomly_sparse(lenet, 0.1)
    assert_same_function(lenet, compact(lenet), torch.rand(8, 1, 28, 28))
    torch.manual_seed(0)  # which silent filters end as positive constants depends on the initial weights
    vgg = build_model(build_spec("vgg-like", (3, 32, 32), 10, width=0.0625, variational=True))
    randomly_sparse(vgg, 0.3)
    layers = variational_layers(vgg)
    # silent filters / units in batch-normed layers: their constant output (the batch norm of a zero or of the
    # bias) must be folded into what reads them, and the input channels of the next conv must go
    for index, silent in ((2, [1, 5]), (13, [0, 7, 20])):
        keep = layers[index].log_alpha < 3
        keep[silent] = False
        set_keep(layers[index], keep)
    vgg.train()
    vgg(torch.rand(16, 3, 32, 32))  # fill the batch-norm running statistics with something non-trivial
    small = compact(vgg)
    assert_same_function(vgg, small, torch.rand(4, 3, 32, 32))
    # a silent conv filter whose batch norm + ReLU gives a positive constant stays: zero padding makes its
    # contribution to the next conv position-dependent, so it cannot become that conv's bias
    assert small.spec["layers"][2]["out"] < 8 and small.spec["layers"][3]["in"] == small.spec["layers"][2]["out"]
    assert small.spec["layers"][13]["out"] <= 29


def test_the_right_units_disappear() -> None:
    net = build_model(build_spec("mlp-6-5", (1, 2, 2), 3, variational=True))
    first, second, last = variational_layers(net)
    keep1 = torch.ones(6, 4, dtype=torch.bool)
    keep1[[1, 4]] = False  # hidden units 1 and 4 of layer 1 get no input
    keep1[:, 2] = False  # input pixel 2 is read by nobody
    keep2 = torch.ones(5, 6, dtype=torch.bool)
    keep3 = torch.ones(3, 5, dtype=torch.bool)
    keep3[:, 3] = False  # layer-2 unit 3 is read by nobody
    for layer, keep in ((first, keep1), (second, keep2), (last, keep3)):
        set_keep(layer, keep)
    with torch.no_grad():  # units 1 and 4 output relu(bias): make 1 dead (negative), 4 constant (positive)
        first.bias[1], first.bias[4] = -1.0, 0.7
    small = compact(net)
    assert small.input_index.tolist() == [0, 1, 3]
    assert [(lay["in"], lay["out"]) for lay in small.spec["layers"]] == [(3, 4), (4, 4), (4, 3)]
    assert_same_function(net, small, torch.rand(16, 1, 2, 2))


def test_removal_repeats_until_a_unit_freed_by_another_removal_goes_too() -> None:
    # layer-1 unit 0 is read only by layer-2 unit 3, and nobody reads unit 3: dropping unit 3 leaves unit 0
    # unread, which only a second pass over the layers sees
    net = build_model(build_spec("mlp-6-5", (1, 2, 2), 3, variational=True))
    first, second, last = variational_layers(net)
    keep2 = torch.ones(5, 6, dtype=torch.bool)
    keep2[:, 0] = False
    keep2[3, 0] = True
    keep3 = torch.ones(3, 5, dtype=torch.bool)
    keep3[:, 3] = False
    for layer, keep in ((first, torch.ones(6, 4, dtype=torch.bool)), (second, keep2), (last, keep3)):
        set_keep(layer, keep)
    small = compact(net)
    assert [(lay["in"], lay["out"]) for lay in small.spec["layers"]] == [(4, 5), (5, 4), (4, 3)]
    assert_same_function(net, small, torch.rand(16, 1, 2, 2))


def test_a_layer_pruned_to_nothing_still_gives_the_masked_outputs() -> None:
    net = build_model(build_spec("mlp-10-6", (1, 3, 3), 4, variational=True))
    randomly_sparse(net, 0.5)
    set_keep(variational_layers(net)[1], torch.zeros(6, 10, dtype=torch.bool))  # layer 2 entirely dead
    small = compact(net)
    assert_same_function(net, small, torch.rand(8, 1, 3, 3))
    assert small.spec["layers"][1]["out"] == 1  # one constant unit kept so every layer keeps a shape
    assert nonzero_weights(small) == 0


def test_nonzero_counts_add_up() -> None:
    net = build_model(build_spec("mlp-30-20", (1, 6, 6), 10, variational=True))
    randomly_sparse(net, 0.05, seed=3)
    table = layer_table(net)
    expected = sum(int(layer.keep_mask().sum()) for layer in variational_layers(net))
    assert sum(row["nonzero"] for row in table) == expected
    for row in table:
        assert row["sparsity_pct"] == pytest.approx(100 * (1 - row["nonzero"] / row["weights"]))
    small = compact(net)
    # compaction keeps every weight that can still change an output, and never invents one
    assert 0 < nonzero_weights(small) <= expected
