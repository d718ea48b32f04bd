"""The library API: the README's example runs as written, and `help(emotiw)` lists the stages."""

import pydoc
import re
from pathlib import Path

import emotiw

README = Path(__file__).resolve().parents[1] / "README.md"
STAGES = ("preprocess", "detect", "train", "test", "extract", "fuse", "predict")


def readme_example():
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_help_lists_the_stage_functions():
    text = pydoc.render_doc(emotiw, renderer=pydoc.plaintext)
    for name in STAGES:
        assert re.search(rf"^    {name}\(", text, re.MULTILINE), name
        assert callable(getattr(emotiw, name))


def test_importing_emotiw_loads_no_stage():
    import subprocess
    import sys

    code = "import sys, emotiw; print(sorted(m for m in sys.modules if m.startswith(('emotiw.', 'numpy', 'cv2', 'caffe'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['emotiw.errors']"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("test accuracy") == 2 and "fusion" in printed
    fusion = Path("fused/fusion.json")
    assert fusion.is_file() and len(list(Path("fused/submission").glob("*.txt"))) == 7
    for net in ("sse_holonet_3conv-s_concat", "sse_holonet_3conv-s_eltwise"):
        assert Path(f"scores/{net}/test/scores.txt").is_file()
