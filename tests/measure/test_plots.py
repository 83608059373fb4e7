"""Plots (slimtune.measure.plots): the Pareto front the cost plots draw."""

from slimtune.measure.plots import pareto_front


def test_pareto_front():
    # cost, metric: (1, .5) (2, .7) (2, .6) dominated, (3, .65) dominated, (4, .9)
    points = [(2, 0.6), (1, 0.5), (2, 0.7), (3, 0.65), (4, 0.9)]
    assert pareto_front(points) == [1, 2, 4]
    assert pareto_front([(1, 10.0), (2, 5.0), (3, 7.0)], higher_is_better=False) == [0, 1]
