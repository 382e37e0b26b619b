import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs():
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model, plain = namespace["model"], namespace["plain"]
    assert type(model.classifier[0]).__name__ == "Linear"
    assert list(plain.state_dict()) == list(model.state_dict())
