"""Plots (slimtune.measure.plots): the Pareto front the cost plots draw."""

from slimtune.measure.plots import pareto_front


def test_pareto_front():
    # cost, metric: (1, .5) (2, .7) (2, .6) dominated, (3, .65) dominated, (4, .9)
    points = [(2, 0.6), (1, 0.5), (2, 0.7), (3, 0.65), (4, 0.9)]
    assert pareto_front(points) == [1, 2, 4]
    assert pareto_front([(1, 10.0), (2, 5.0), (3, 7.0)], higher_is_better=False) == [0, 1]


def test_the_y_axis_can_be_the_accuracy_under_an_attack(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimtune.measure.compare import Summary
    from slimtune.measure.plots import AXES, _panel, plot_tradeoffs

    def group(label, scores, attacked, trainable):
        return Summary(task="t", label=label, method=label, metric="accuracy", scores=scores, costs={"trainable": [trainable] * len(scores)},
                       attacks={"pgd": attacked} if attacked else {})

    groups = [group("lora", [0.8, 0.9], [0.4, 0.6], 10), group("full", [0.95], [0.3], 1000), group("bitfit", [0.7], [], 5)]
    fig, ax = plt.subplots()
    _panel(ax, "t", groups[:2], AXES[0], {"lora": "C0", "full": "C1"}, y_key="pgd")
    assert ax.get_ylabel() == "test accuracy under pgd (%)"
    points = [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines if line.get_marker() == "o"]
    assert points == [(10.0, 50.0), (1000.0, 30.0)]  # means over seeds, in %
    plt.close(fig)
    # bitfit was not attacked: left out; a y no group has draws nothing, and removes an earlier plot
    assert [p.name for p in plot_tradeoffs({"t": groups}, tmp_path, y="pgd")] == ["tradeoff_trainable_params.png"]
    assert plot_tradeoffs({"t": groups}, tmp_path, y="substitution") == [] and not (tmp_path / "tradeoff_trainable_params.png").exists()
