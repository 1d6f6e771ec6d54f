"""The README's Python example runs as written, without a warning."""
import pathlib
import re
import warnings


def test_readme_python_example_runs(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for code in blocks:
            exec(compile(code, "README.md", "exec"), {})
    ours = [w for w in caught if not issubclass(w.category, DeprecationWarning)]  # Triton's interpreter: its own
    assert not ours, [f"{w.category.__name__}: {w.message}" for w in ours]
    out = capsys.readouterr().out
    assert "torch.Size([300, 4, 16])" in out
    assert float(out.split()[-1]) < 1e-5  # kernels (interpreter, float32) against the float64 reference
