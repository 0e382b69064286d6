"""`mpnn telemetry plot`: loss and step time on log axes, smoothed by a rolling median over the faint raw values,
one colour per rank with a legend, and a panel of each rank's compute/comm/optimizer/data shares."""

import json

import numpy as np
import pytest

from mpnn.telemetry.plot import draw_run, rolling_median, run_shares, smoothing_window
from mpnn.telemetry.reader import load_run


def test_rolling_median_ignores_a_spike_and_keeps_a_level_shift():
    values = np.r_[np.ones(50), 100.0, np.ones(49), np.full(100, 3.0)]
    smooth = rolling_median(values, 11)
    assert smooth.shape == values.shape
    assert smooth[50] == 1.0 and smooth[:95].max() == 1.0 and np.all(smooth[106:] == 3.0)


def test_smoothing_window_is_odd_and_bounded():
    assert [smoothing_window(n) for n in (1, 60, 1500, 10**6)] == [1, 1, 31, 101]


def _write_run(root, ranks=2, steps=300):
    rng = np.random.default_rng(0)
    for rank in range(ranks):
        lines = []
        for step in range(1, steps + 1):
            step_s = 0.002 + 0.0005 * rng.random() + (0.05 if step == 1 else 0)
            lines.append(
                {"rank": rank, "step": step, "loss": 2.0 * np.exp(-step / 60) * (1 + 0.3 * rng.random()),
                 "step_s": step_s, "compute_s": 0.5 * step_s, "comm_s": 0.3 * step_s, "opt_s": 0.1 * step_s,
                 "data_s": 0.05 * step_s}
            )  # fmt: skip
        (root / f"worker-{rank}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return load_run(root)


def test_shares_add_up_with_what_no_lane_claims_as_other(tmp_path):
    shares = run_shares(_write_run(tmp_path).ranks[0])
    assert shares == pytest.approx({"compute": 0.5, "comm wait": 0.3, "optimizer": 0.1, "data": 0.05, "other": 0.05})


def test_the_figure_has_log_axes_a_colour_per_rank_and_a_shares_panel(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (optional: pip install matplotlib)")
    figure = draw_run(_write_run(tmp_path, ranks=3))
    ax_loss, ax_time, ax_share = figure.axes
    assert ax_loss.get_yscale() == "log" and ax_time.get_yscale() == "log"
    for ax in (ax_loss, ax_time):
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels == ["rank 0", "rank 1", "rank 2"]
        raw, smooth = ax.get_lines()[0], ax.get_lines()[1]  # each rank: raw (faint), then its rolling median
        assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None
        assert raw.get_color() == smooth.get_color()
        assert len({line.get_color() for line in ax.get_lines()}) == 3
    spiky = ax_time.get_lines()[1].get_ydata()
    assert spiky[0] < 10  # the 52 ms first step shows in the faint line only, not in the median
    assert [t.get_text() for t in ax_share.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    assert [t.get_text() for t in ax_share.get_legend().get_texts()] == [
        "compute", "comm wait", "optimizer", "data", "other"
    ]  # fmt: skip
    widths = [patch.get_width() for patch in ax_share.patches]
    assert sum(widths) == pytest.approx(300.0)  # three ranks' bars, each adding up to 100%


def test_show_without_a_run_dir_reads_the_newest_run_under_runs(tmp_path, monkeypatch):
    import os

    from click.testing import CliRunner

    from mpnn.telemetry.cli import telemetry

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(telemetry, ["show"])
    assert result.exit_code == 1 and "no run directory under runs/" in result.output
    for age, name in ((200, "older"), (100, "newer"), (300, "oldest")):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        _write_run(run, ranks=1, steps=3)
        stamp = 1_700_000_000 - age
        os.utime(run / "worker-0.jsonl", (stamp, stamp))
    (tmp_path / "runs" / "empty").mkdir()  # a directory with nothing of a run in it is not a candidate
    result = CliRunner().invoke(telemetry, ["show"])
    assert result.exit_code == 0, result.output
    assert "in runs/newer" in result.output
