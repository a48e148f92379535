"""The whole toy workflow at tiny sizes (`make smoke`), so a break anywhere in the chain shows."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_smoke_chain_from_toy_world_to_report(tmp_path):
    run = tmp_path / "smoke"
    sorakit = Path(sys.executable).parent / "sorakit"
    demo_end = int(time.time()) + 3600  # as `make demo` passes it
    cmd = ["make", "-C", str(ROOT / "recipes" / "toy"), "smoke", f"RUN={run}", f"SORAKIT={sorakit}",
           f"DEMO_END={demo_end}", "AFTER_DIT_MINUTES=7"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # Every stage left its self-describing output.
    for path in ["shards/manifest.json", "captioner/config.json", "captioned/manifest.json", "vae/config.json",
                 "latents/manifest.json", "pipeline/pipeline.json", "refiner_sr/config.json", "samples/index.html",
                 "report.md"]:
        assert (run / path).is_file(), path
    # The DiT was told to end early enough for sampling and evaluation to keep the demo's deadline.
    trainer = yaml.safe_load((run / "pipeline" / "train_config.yaml").read_text())["trainer"]
    assert trainer["finish_by"] == demo_end - 7 * 60
    for name in ["vae", "captioner", "toyworld", "refiner"]:
        json.loads((run / "metrics" / f"{name}.json").read_text())
    for mode in ["image_to_video", "extend_forward", "extend_backward", "interpolate"]:
        assert (run / "modes" / f"{mode}.mp4").is_file() and (run / "modes" / f"{mode}.json").is_file()
    # A second run finds everything done and redoes nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert " train " not in again.stdout and " toyworld " not in again.stdout, again.stdout[-2000:]
