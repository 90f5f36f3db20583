"""engine.runtime.log: the console format and streams, which rank says what, and the log files (train.log: rank
0's, held until the run is accepted, then written with every later message, nothing for a refused run;
train_rank<r>.log: another rank's warnings)."""
import re

import pytest

from engine.runtime import log as run_log

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


@pytest.fixture
def log(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # no process group here: the rank comes from RANK
    run_log.detach_run_log()
    yield run_log.get_logger("engine.test_module")
    run_log.detach_run_log()


def test_names_hang_under_arcscale():
    assert run_log.get_logger("engine.train.hooks").logger.name == "arcscale.train.hooks"
    assert run_log.get_logger("heads.partial_fc").logger.name == "arcscale.heads.partial_fc"


def test_console_format_and_streams(log, capsys):
    log.info("step 1/2 loss 1.0")
    log.warning("two lines\nsecond")
    log.error("ValueError: bad")
    log.error("stopping: a collective failed", bare=True)
    out, err = capsys.readouterr()
    assert out == "step 1/2 loss 1.0\n"  # info: the message as it is, on stdout
    assert err.splitlines() == ["[rank 0] warning: two lines", "[rank 0] second", "[rank 0] error: ValueError: bad",
                                "[rank 0] stopping: a collective failed"]


def test_other_ranks_give_warnings_only(log, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    log.info("rank 0 says this")
    log.warning("job-wide", once=True)
    log.warning("mine")
    out, err = capsys.readouterr()
    assert out == "" and err == "[rank 3] warning: mine\n"
    monkeypatch.setenv("RANK", "0")
    log.warning("job-wide", once=True)
    assert capsys.readouterr().err == "[rank 0] warning: job-wide\n"


def test_run_log_holds_until_accepted_then_appends(log, tmp_path, capsys):
    run_log.hold_run_log()
    log.info("data: 6 images")
    log.warning("resuming without restoring: RNG state")
    assert not (tmp_path / "train.log").exists()  # not accepted yet: nothing written into the directory
    path = run_log.attach_run_log(tmp_path)
    assert path == tmp_path / run_log.RUN_LOG_NAME and run_log.run_log_path() == path
    log.info("step 1/2")
    run_log.detach_run_log()
    log.info("after the job")
    lines = path.read_text().splitlines()
    assert [re.sub(STAMP, "", line) for line in lines] == [
        "data: 6 images", "[rank 0] warning: resuming without restoring: RNG state", "step 1/2"]
    assert all(re.match(STAMP, line) for line in lines), lines
    assert capsys.readouterr().out.count("data: 6 images") == 1  # the console had it at once, and only once

    run_log.hold_run_log()  # a resumed run appends to the file
    run_log.attach_run_log(tmp_path)
    log.info("step 2/2")
    run_log.detach_run_log()
    assert [re.sub(STAMP, "", line) for line in path.read_text().splitlines()][-1] == "step 2/2"


def test_a_refused_run_writes_no_run_log(log, tmp_path):
    run_log.hold_run_log()
    log.info("data: 6 images")
    log.error("ValueError: checkpoint belongs to another run")
    run_log.detach_run_log()  # never attached: the held messages are dropped
    run_log.attach_run_log(tmp_path)  # a later job in this process starts without them
    run_log.detach_run_log()
    assert (tmp_path / "train.log").read_text() == ""


def test_another_rank_writes_its_warnings_to_its_own_file(log, tmp_path, monkeypatch):
    """Only rank 0 writes the shared train.log; rank 1's warnings go to train_rank1.log, made at the first."""
    monkeypatch.setenv("RANK", "1")
    path = run_log.attach_run_log(tmp_path)
    log.info("rank 0's business")
    assert path == tmp_path / "train_rank1.log" and not path.exists()  # a quiet rank leaves no file
    log.warning("received SIGTERM: stopping after this step with a checkpoint")
    run_log.detach_run_log()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_rank1.log"]
    text = re.sub(STAMP, "", path.read_text())
    assert text == "[rank 1] warning: received SIGTERM: stopping after this step with a checkpoint\n"


def test_lines_written_to_stderr_directly_are_appended(log, tmp_path):
    """The step watchdog writes its stack dump to stderr itself (one write): train.log gets the lines too."""
    block = "[rank 1] watchdog: step 3 has run 61.0 s\n[rank 1]   File \"x.py\", line 5 in frozen\n"
    run_log.append_to_run_log(block)  # no run log open: nothing, no error
    run_log.attach_run_log(tmp_path)
    run_log.append_to_run_log(block)
    run_log.detach_run_log()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [re.sub(STAMP, "", line) for line in lines] == block.splitlines()
