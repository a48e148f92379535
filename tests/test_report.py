import json

from PIL import Image

from sorakit.cli import main


def test_report_collects_metrics_and_plots_losses(tmp_path):
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "vae.json").write_text(json.dumps({"mean": {"psnr": 31.25, "ssim": 0.9}, "clips": [{"psnr": 1}], "model": {"path": "/m", "steps": 3}}))
    logs = run / "vae" / "logs"
    logs.mkdir(parents=True)
    rows = ["step,train/loss,lr"] + [f"{s},{1.0 / (s + 1)},0.1" for s in range(0, 50, 5)]
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "| vae | mean.psnr | 31.25 |" in text
    assert "clips" not in text and "model" not in text  # per-item lists and descriptions stay in the JSON
    plot = run / "plots" / "vae_loss.png"
    assert Image.open(plot).size == (640, 360)
    assert "plots/vae_loss.png" in text


def test_missing_run_dir_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no such run directory" in capsys.readouterr().err
