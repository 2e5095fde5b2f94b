"""The calibration report: its numbers agree with quantization_mse, the PNG is written, and a
missing matplotlib gives a clear error."""

import sys

import numpy as np
import pytest
import torch

from quantkit import calibrate, quantization_mse
from quantkit.report import calibration_report, format_report, plot_calibration


def _data():
    return np.random.default_rng(0).standard_t(3, 20_000).astype(np.float32)


def test_report_numbers_are_exact():
    x = _data()
    r = calibration_report(x, points=50)
    assert r.n == x.size and r.amax == float(np.abs(x).max())
    assert set(r.methods) == {"max", "percentile", "entropy", "mse"}
    for m, res in r.methods.items():
        assert res.alpha == calibrate(x, m)
        q = quantization_mse(x, res.alpha)
        assert (res.mse, res.clipping, res.rounding) == (q.mse, q.clipping, q.rounding)
    np.testing.assert_allclose(r.clipping + r.rounding, r.mse, rtol=1e-12)
    assert r.best_method() == "mse" and r.methods["mse"].ratio == 1.0
    assert r.methods["mse"].mse <= r.mse.min() * 1.001
    i = np.searchsorted(r.alphas, r.methods["max"].alpha)
    assert r.mse[i] == pytest.approx(r.methods["max"].mse, rel=1e-12)
    assert r.clipping[-1] == 0  # nothing is clipped at max |x|
    text = format_report(r)
    assert "mse" in text and "entropy" in text and len(text.splitlines()) == 6


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "calibration.png"
    x = torch.from_numpy(_data())
    before = x.clone()
    r = plot_calibration(x, path, methods=("max", "mse"), points=40, title="t(3)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(r.methods) == {"max", "mse"}
    assert torch.equal(x, before)
    plot_calibration(np.zeros(10, np.float32), tmp_path / "zeros.png", points=5)
    assert (tmp_path / "zeros.png").stat().st_size > 0


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"quantkit\[plot\]"):
        plot_calibration(_data(), tmp_path / "x.png")


def test_report_bad_input():
    with pytest.raises(ValueError, match="methods"):
        calibration_report(_data(), methods=("max", "kl"))
    with pytest.raises(ValueError, match="methods"):
        calibration_report(_data(), methods=())
    with pytest.raises(ValueError, match="points"):
        calibration_report(_data(), points=1)
    with pytest.raises(ValueError, match="empty"):
        calibration_report(np.zeros(0, np.float32))
    x = _data()
    x[5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        calibration_report(x)
