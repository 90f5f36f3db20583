"""The README-command harness of tests/launch/test_readme.py: fenced blocks of the Markdown files, their
readme-test markers, and the shortening the test applies to the commands that train (see that test's docstring
for the rules). Here so tests/unit/test_readme_blocks.py can check the harness itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SHELL = {"bash", "sh", "shell"}
RUNNABLE = SHELL | {"python"}
SKIP_KINDS = {
    "gpu": "needs GPUs this machine does not have",
    "dataset": "needs a dataset that is not in the repository",
    "suite": "is the test suite this test belongs to",
    "not-code": "is a data layout, not a program",
}
SHORTEN_TRAIN = ["engine.train.max_steps=2", "train_micro_batch_size_per_gpu=2"]
SHORTEN_DEFAULTS = ["engine.eval.at_start=false"]  # before the command's own --set: it may ask for it
SHORTEN_PROFILE_ARGS = ["--steps", "1", "--warmup", "1"]
SHORTEN_PROFILE_SETS = ["train_micro_batch_size_per_gpu=2"]
# Not linked into the scratch copy: outputs of the commands, and what a command must not write through.
NOT_LINKED = {".git", "outputs", "work_dirs", "ds_configs", "__pycache__", ".pytest_cache", ".ruff_cache"}
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->$")
TRAINS = re.compile(r"(^|\s)(\S*run\.py|\S*scripts/demo\.sh)(\s|$)")
PROFILES = re.compile(r"(^|\s)(-m|--module)\s+engine\.profile(\s|$)")


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it (README.md, docs/x.md), else as it is."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: Optional[str] = None  # "kind: reason"
    sets: List[str] = field(default_factory=list)
    unshortened: bool = False

    @property
    def name(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def parse_blocks(path: Path) -> List[Block]:
    """The fenced blocks of `path` with the marker on the line before each (errors name the file and line)."""
    lines = path.read_text().splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)\s*([\w-]*)", lines[i])
        if not fence:
            if MARKER.match(lines[i].strip()) and not (i + 1 < len(lines) and lines[i + 1].lstrip().startswith("```")):
                raise AssertionError(f"{_shown(path)}:{i + 1}: a readme-test marker must stand on the "
                                     "line just before a block's opening fence")
            i += 1
            continue
        indent, ticks, lang = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
        assert end is not None, f"{_shown(path)}:{i + 1}: unclosed fence"
        body = "\n".join(line[len(indent):] for line in lines[i + 1:end]) + "\n"
        block = Block(path, i + 1, lang.lower(), body)
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        if marker:
            words = marker.group("body")
            if words.startswith("skip "):
                kind, _, reason = words[5:].partition(":")
                assert kind.strip() in SKIP_KINDS and reason.strip(), (
                    f"{block.name}: expected '<!-- readme-test: skip KIND: reason -->' with KIND one of "
                    f"{sorted(SKIP_KINDS)}, got {words!r}")
                block.skip = f"{kind.strip()}: {reason.strip()}"
            elif words.startswith("unshortened:"):
                assert words[len("unshortened:"):].strip(), f"{block.name}: say why the block runs unshortened"
                block.unshortened = True
            elif words.startswith("set "):
                block.sets = words[4:].split()
                assert block.sets and all("=" in s for s in block.sets), f"{block.name}: bad set marker {words!r}"
            else:
                raise AssertionError(f"{block.name}: unknown readme-test marker {words!r} (skip, set or "
                                     "unshortened)")
        blocks.append(block)
        i = end + 1
    return blocks


def split_comment(line: str) -> tuple:
    """(command, ' # comment') of one shell line: a # that starts a word outside quotes."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), "  " + line[k:]
    return line.rstrip(), ""


def _sets(overrides: List[str]) -> str:
    return " ".join(f"--set {o}" for o in overrides)


def _with_defaults(code: str) -> str:
    """`code` with SHORTEN_DEFAULTS right after its `--config FILE` (unchanged without one)."""
    return re.sub(r"(--config\s+\S+)", lambda m: f"{m.group(1)} {_sets(SHORTEN_DEFAULTS)}", code, count=1)


def shorten(script: str, extra_sets: List[str], port: int, train: bool = True) -> str:
    """The block as the test runs it: each logical command (backslash continuations joined) that trains gets the
    shortening overrides (unless not `train`); each launcher without a port gets `port`."""
    logical: List[str] = []
    pending = ""
    for raw in script.splitlines():
        code, comment = split_comment(raw)
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        logical.append(pending + code + comment)
        pending = ""
    if pending:
        logical.append(pending)
    out = []
    for line in logical:
        code, comment = split_comment(line)
        background = code.endswith("&")
        if background:
            code = code[:-1].rstrip()
        if re.search(r"(^|\s)deepspeed\s", code) and "--master_port" not in code:
            code = re.sub(r"(^|\s)deepspeed\s", rf"\1deepspeed --master_port {port} ", code, count=1)
        if re.search(r"(^|\s)torchrun\s", code) and "--master-port" not in code and "--master_port" not in code:
            code = re.sub(r"(^|\s)torchrun\s", rf"\1torchrun --master-port {port} ", code, count=1)
        if train and PROFILES.search(code):
            code = " ".join([_with_defaults(code), *SHORTEN_PROFILE_ARGS, _sets(SHORTEN_PROFILE_SETS + extra_sets)])
        elif train and TRAINS.search(code):
            code = " ".join([_with_defaults(code), _sets(SHORTEN_TRAIN + extra_sets)])
        out.append(code + (" &" if background else "") + comment)
    return "\n".join(out) + "\n"
