"""The README's Python example runs as written."""
import pathlib
import re


def test_readme_python_example_runs(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size" in capsys.readouterr().out
