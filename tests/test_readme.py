import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2, "README must open with the main-job and the test commands"
    ci_lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert blocks[1] in ci_lines, f"the README test command {blocks[1]!r} is not what .ci/run runs"


def test_test_command_installs_with_the_pinned_torch():
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text
