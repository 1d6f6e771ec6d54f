"""The README's Python example runs as written."""
import pathlib
import re


def test_readme_python_example_runs(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([300, 4, 16])" in out
    assert float(out.split()[-1]) < 1e-5  # kernels (interpreter, float32) against the float64 reference
