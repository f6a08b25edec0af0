"""The README's "From Python" snippet runs as written, and `dmlp purify` gives the same labels on the same arrays."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _snippet(heading: str) -> str:
    section = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_gives_the_labels_of_dmlp_purify(tmp_path):
    # the snippet as written, then its arrays saved for the CLI (the one addition)
    save = ("\nnp.save('x.npy', x); np.save('noisy.npy', noisy); np.save('hard.npy', result.hard)\n"
            "np.savetxt('trusted.csv', np.c_[trusted, y[trusted]], fmt='%d', delimiter=',', header='index,label')\n"
            "import json; json.dump(result.estimated_accuracy, open('estimate.json', 'w'))\n")
    (tmp_path / "snippet.py").write_text(_snippet("## From Python") + save)
    r = subprocess.run([sys.executable, "snippet.py"], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr
    before, after, estimate = map(float, re.search(r"label accuracy ([\d.]+) -> ([\d.]+); estimated without true "
                                                  r"labels ([\d.]+)", r.stdout).groups())
    assert before < 0.6 and after > 0.95 and abs(estimate - after) < 0.1
    assert r.stdout.strip() in (ROOT / "README.md").read_text()  # the README quotes what it prints

    (tmp_path / "cli.yaml").write_text(
        "dataset: {name: npy, params: {labels: noisy.npy}}\nnoise: {kind: none}\n"
        "trusted: {source: index_file, file: trusted.csv}\n"
        "features: {source: npy, path: x.npy, second_view: same}\npreprocessor: {name: dmlp}\n"
        "checks: {compare: []}\n")
    r = subprocess.run([sys.executable, "-m", "dmlp_plugin", "purify", "cli.yaml", "--out", "out", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr
    from dmlp_plugin import load_labels

    art = load_labels(tmp_path / "out" / "labels.npz")
    np.testing.assert_array_equal(art.hard, np.load(tmp_path / "hard.npy"))
    cli_estimate = json.loads((tmp_path / "out" / "metrics.json").read_text())["estimated_accuracy"]["dmlp"]
    api_estimate = json.loads((tmp_path / "estimate.json").read_text())
    assert cli_estimate["estimate"] == api_estimate["estimate"] and cli_estimate["low"] == api_estimate["low"]
