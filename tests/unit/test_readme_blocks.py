"""The README-command harness (tests/support/readme_blocks.py) on small Markdown: which blocks run, what a
marker means, and how a training command is shortened, so tests/launch/test_readme.py runs what it claims to."""
from __future__ import annotations

import pytest

from tests.support import readme_blocks as rb

DOC = """# A doc

```bash
python run.py --config ds_configs/r50.json --set engine.train.max_steps=1000   # trains
```

<!-- readme-test: skip gpu: 8 GPUs -->
```bash
deepspeed --num_gpus 8 run.py --config ds_configs/r2060.json
```

<!-- readme-test: set engine.profile.start_step=1 engine.profile.num_steps=1 -->
```sh
printf 'a slots=1\\n' > hostfile   # not a training command
deepspeed --hostfile hostfile run.py \\
    --config ds_configs/quickstart.json --set engine.eval.at_start=true &
python -m engine.profile --config ds_configs/mbf.json --steps 5 --warmup 2 --world-sizes 1,2
torchrun --nproc_per_node 2 run.py --config c.json
wait $!
```

```
text, not run
```

<!-- readme-test: unshortened: its check needs the whole run -->
```python
print("hello")
```
"""


def _blocks(tmp_path, text=DOC):
    path = tmp_path / "doc.md"
    path.write_text(text)
    return rb.parse_blocks(path)


def test_blocks_and_markers(tmp_path):
    blocks = _blocks(tmp_path)
    assert [(b.lang, b.skip, b.sets, b.unshortened) for b in blocks] == [
        ("bash", None, [], False),
        ("bash", "gpu: 8 GPUs", [], False),
        ("sh", None, ["engine.profile.start_step=1", "engine.profile.num_steps=1"], False),
        ("", None, [], False),
        ("python", None, [], True),
    ]
    assert blocks[0].line == 3 and blocks[0].name == f"{tmp_path / 'doc.md'}:3"
    assert rb.parse_blocks(rb.ROOT / "README.md")[0].name.startswith("README.md:")


@pytest.mark.parametrize("text,message", [
    ("<!-- readme-test: skip gpu -->\n```bash\nls\n```\n", "skip KIND: reason"),
    ("<!-- readme-test: skip laptop: no -->\n```bash\nls\n```\n", "KIND one of"),
    ("<!-- readme-test: run twice -->\n```bash\nls\n```\n", "unknown readme-test marker"),
    ("<!-- readme-test: skip gpu: x -->\n\ntext\n```bash\nls\n```\n", "just before a block's opening fence"),
    ("```bash\nls\n", "unclosed fence"),
])
def test_bad_markers_are_named(tmp_path, text, message):
    with pytest.raises(AssertionError, match=message):
        _blocks(tmp_path, text)


def test_training_commands_are_shortened(tmp_path):
    first, _, third = _blocks(tmp_path)[:3]
    assert rb.shorten(first.code, first.sets, 1234).splitlines() == [
        "python run.py --config ds_configs/r50.json --set engine.eval.at_start=false --set engine.train.max_steps=1000"
        " --set engine.train.max_steps=2 --set train_micro_batch_size_per_gpu=2  # trains"]
    lines = rb.shorten(third.code, third.sets, 1234).splitlines()
    extra = "--set engine.profile.start_step=1 --set engine.profile.num_steps=1"
    assert lines == [
        "printf 'a slots=1\\n' > hostfile  # not a training command",
        "deepspeed --master_port 1234 --hostfile hostfile run.py      --config ds_configs/quickstart.json "
        "--set engine.eval.at_start=false --set engine.eval.at_start=true --set engine.train.max_steps=2 "
        f"--set train_micro_batch_size_per_gpu=2 {extra} &",
        "python -m engine.profile --config ds_configs/mbf.json --set engine.eval.at_start=false --steps 5 --warmup 2 "
        f"--world-sizes 1,2 --steps 1 --warmup 1 --set train_micro_batch_size_per_gpu=2 {extra}",
        "torchrun --master-port 1234 --nproc_per_node 2 run.py --config c.json --set engine.eval.at_start=false "
        f"--set engine.train.max_steps=2 --set train_micro_batch_size_per_gpu=2 {extra}",
        "wait $!",
    ]
    assert rb.shorten(third.code, [], 99, train=False).splitlines()[1].startswith(
        "deepspeed --master_port 99 --hostfile hostfile run.py ") and "max_steps" not in rb.shorten(
        third.code, [], 99, train=False)
