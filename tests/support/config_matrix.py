"""The configuration matrix: combinations of every documented setting, so that every pair of values of every two
dimensions occurs in at least one combination (pairwise testing), each run for 2 steps through a real entry point.

    python -m tests.support.config_matrix                     # list the combinations (seed 0, every dimension)
    python -m tests.support.config_matrix --seed 7 --dims precision,backend,engine.model.name
    python -m tests.support.config_matrix --run 12 [--out DIR]  # run one combination, print its verdict

Dimensions are read from the config schema, not listed here: every key `engine.config.schema.documented_settings()`
returns with choices (an enumeration) or representative values (a key that changes the code path), plus
"backend" (engine.train.backend x zero_optimization.stage for deepspeed, x engine.fsdp.reshard_after_forward for
fsdp), "precision" (deepspeed_keys.PRECISION_ROUTES), and the two this module adds: the entry point (run.py,
engine.profile) and the world size (1 rank without a launcher, 2 ranks with the deepspeed launcher's environment:
tests/support/forkserver.py starts each run's ranks from one process that imported torch and deepspeed). A key or
value documented in the schema joins the matrix with nothing here to edit.

Which combinations the config refuses is asked of the config checks themselves (`schema.from_dict` and
`schema.check_device` for this machine's device), never written here: pairs of values that train are covered by
combinations the checks accept, and every pair the checks refuse (and every value refused on its own) by a
combination that must be refused before launch. The covering array is greedy (AETG-like: each new combination
starts from an uncovered pair and takes, dimension by dimension, the value covering most new pairs; ties go to the
cheaper value, then to a seeded coin), so a seed gives the same set on the same kind of device.

Verdict of a run: "trains" (exit 0, a finite final loss in summary.json) or "refused" (exit 2 and one line
`config error: ...` naming a key the combination sets); a traceback, another exit status, a non-finite loss or a
hang (timeout) is a failure. The verdict must also be the one the config checks predicted.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tests.support.forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
TIMEOUT_S = 420.0  # per combination: a hang fails here (a 2-rank fp16 r18 run takes about a minute)
DATA = "{data}"  # placeholder for the folder the matrix's small datasets are written to (`write_data`)

# The run every combination starts from: tiny, 2 steps, micro-batch 2, no evaluation, one log line per step.
BASE: Dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 0},
    "engine": {
        "model": {"name": "r18", "embedding_size": 64},
        "head": {"num_classes": 11, "scale": 16.0},
        "data": {"source": "synthetic", "num_workers": 0},
        "optim": {"lr": 0.01},
        "train": {"max_steps": STEPS, "log_every": 1, "seed": 1, "watchdog_factor": 0},
        "checkpoint": {"keep": 1},
    },
}
# Datasets by source (num_classes null: the data's count). recordio reads the demo set's rec.
SOURCE_SETTINGS = {
    "demo": {"engine.data.path": f"{DATA}/demo", "engine.head.num_classes": None},
    "recordio": {"engine.data.path": f"{DATA}/demo", "engine.head.num_classes": None},
    "folder": {"engine.data.path": f"{DATA}/folder", "engine.head.num_classes": None},
}
# Relative cost of a value (a combination costs the product of its values'), so the greedy spreads the expensive
# values over cheap combinations instead of stacking them: measured on 2 CPU cores (fp16 on a CPU without native
# fp16 arithmetic runs r18 at ~0.1 images/s). Only steers the choice; coverage does not depend on it.
COST = {("world", "2"): 2.5, ("entry", "profile"): 1.3, ("engine.model.name", "r18"): 2.5,
        ("engine.model.name", "vit_t"): 1.5, ("gradient_accumulation_steps", "2"): 1.8,
        ("engine.model.checkpoint", "all"): 1.3, ("engine.fsdp.cpu_offload", "true"): 1.2}
CPU_COST = {("precision", "autocast_fp16"): 6.0, ("precision", "fp16"): 6.0}
STARTUP = 1.0  # a process's start-up (python, torch, deepspeed imports) in the same unit


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One axis: its name and values, each a (label, patch) pair; a patch maps dotted keys to values (None:
    the key is left out)."""

    name: str
    values: Tuple[Tuple[str, Dict[str, Any]], ...]


@dataclasses.dataclass
class Combination:
    index: int
    picks: Dict[str, str]  # dimension -> value label
    patch: Dict[str, Any]
    expected: str  # "trains" or "refused", as the config checks say
    world: int
    entry: str
    focus: Tuple[str, ...] = ()  # the keys a refusal must name (those the combination changes from the base)

    def describe(self) -> str:
        return f"c{self.index:02d} [{self.expected}] " + " ".join(f"{k}={v}" for k, v in self.picks.items())


def _label(value: Any) -> str:
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def dimensions(only: Optional[Sequence[str]] = None) -> List[Dimension]:
    """The matrix's dimensions, from the schema's documented settings (see the module docstring)."""
    from engine.config import schema
    from engine.config.deepspeed_keys import PRECISION_ROUTES

    settings = {s.key: s for s in schema.documented_settings()}
    backend: List[Tuple[str, Dict[str, Any]]] = []
    for name in settings["engine.train.backend"].draws:
        if name == "deepspeed":
            backend += [(f"zero{s}", {"engine.train.backend": name, "zero_optimization.stage": s})
                        for s in settings["zero_optimization.stage"].draws]
        elif name == "fsdp":
            backend += [(f"fsdp_reshard_{str(r).lower()}", {"engine.train.backend": name,
                                                             "engine.fsdp.reshard_after_forward": r})
                        for r in settings["engine.fsdp.reshard_after_forward"].draws]
        else:
            backend.append((name, {"engine.train.backend": name}))
    dims = [Dimension("backend", tuple(backend)),
            Dimension("precision", tuple((route, dict(blocks)) for route, blocks in PRECISION_ROUTES.items()))]
    consumed = {"engine.train.backend", "zero_optimization.stage", "engine.fsdp.reshard_after_forward", "precision"}
    for key, s in settings.items():
        if key in consumed or not s.draws:
            continue
        values = []
        for v in s.draws:
            patch = {key: v}
            if key == "engine.data.source":
                patch.update(SOURCE_SETTINGS.get(v, {}))
            values.append((_label(v), patch))
        dims.append(Dimension(key, tuple(values)))
    dims.append(Dimension("entry", (("run", {}), ("profile", {}))))
    dims.append(Dimension("world", (("1", {}), ("2", {}))))
    if only:
        unknown = sorted(set(only) - {d.name for d in dims})
        if unknown:
            raise ValueError(f"unknown dimension(s) {unknown}; known: {[d.name for d in dims]}")
        dims = [d for d in dims if d.name in only]
    return dims


def apply_patch(raw: Dict[str, Any], patch: Dict[str, Any]) -> Dict[str, Any]:
    """`raw` with each dotted key of `patch` set (None: removed); "precision" patches are top-level blocks."""
    out = copy.deepcopy(raw)
    for key, value in patch.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return out


def config_for(patch: Dict[str, Any], data_dir: str = "/nonexistent") -> Dict[str, Any]:
    raw = apply_patch(BASE, patch)
    return json.loads(json.dumps(raw).replace(DATA, data_dir))


class Oracle:
    """Asks engine.config whether a combination is refused before launch (load's checks and the device check for
    `device_type`), caching by patch."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.cache: Dict[str, Optional[str]] = {}

    def refusal(self, patch: Dict[str, Any]) -> Optional[str]:
        key = json.dumps(patch, sort_keys=True)
        if key not in self.cache:
            from engine.config import schema

            try:
                # the data paths only need to exist for the data source's own check (at build time)
                cfg = schema.from_dict(config_for(patch, str(ROOT)))
                schema.check_device(cfg, self.device_type)
                self.cache[key] = None
            except schema.ConfigError as exc:
                self.cache[key] = str(exc)
        return self.cache[key]


_ORACLES: Dict[str, Oracle] = {}


def _merge(dims: List[Dimension], picks: Dict[int, int]) -> Dict[str, Any]:
    patch: Dict[str, Any] = {}
    for d, v in sorted(picks.items()):
        patch.update(dims[d].values[v][1])
    return patch


def _validity(dims: List[Dimension], base: Dict[int, int], oracle: Oracle):
    """(good pairs, refused pairs, values refused in every context), asked of the config checks.

    A value refused beside the base combination may need another setting to be valid (engine.fsdp.hybrid needs
    engine.train.backend fsdp, DeepSpeed's activation_checkpointing section needs engine.model.checkpoint): its
    "enablers" are the single other values that make it accepted. A pair is good when it is accepted beside the
    base, or with an enabler of either value; refused otherwise. A value without enablers is refused alone."""
    def ok(*picks) -> bool:
        merged = dict(base)
        merged.update(picks)
        return oracle.refusal(_merge(dims, merged)) is None

    values = [(d, v) for d in range(len(dims)) for v in range(len(dims[d].values))]
    enablers = {}
    for x in values:
        if not ok(x):
            enablers[x] = [y for y in values if y[0] != x[0] and y[1] != base[y[0]] and ok(x, y)]
    bad_value = {x for x, found in enablers.items() if not found}
    good, bad_pairs = set(), set()
    for x, y in itertools.combinations(values, 2):
        if x[0] == y[0] or x in bad_value or y in bad_value:
            continue
        fixes = [()] + [(e,) for e in enablers.get(x, []) + enablers.get(y, []) if e[0] not in (x[0], y[0])]
        fixes += [(ex, ey) for ex in enablers.get(x, []) for ey in enablers.get(y, [])
                  if len({ex[0], ey[0], x[0], y[0]}) == 4]
        (good if any(ok(x, y, *fix) for fix in fixes) else bad_pairs).add((x, y))
    return good, bad_pairs, bad_value


def covering_array(dims: List[Dimension], seed: int, oracle: Oracle,
                   candidates: int = 24) -> Tuple[List[Tuple[Dict[int, int], bool]], set]:
    """([(picks {dimension index: value index}, accepted)], pairs left uncovered): accepted combinations covering
    every pair the config accepts, then refused ones covering every pair (or lone value) it refuses."""
    rng = random.Random(seed)
    base = {d: 0 for d in range(len(dims))}
    if oracle.refusal(_merge(dims, base)) is not None:
        raise AssertionError(f"the matrix's base combination is refused: {oracle.refusal(_merge(dims, base))}")
    good, bad_pairs, bad_value = _validity(dims, base, oracle)

    def pairs_of(picks: Dict[int, int]):
        return set(itertools.combinations(sorted(picks.items()), 2))

    costs = {**COST, **(CPU_COST if oracle.device_type == "cpu" else {})}

    def cost(d: int, v: int) -> float:
        return costs.get((dims[d].name, dims[d].values[v][0]), 1.0)

    def total_cost(picks: Dict[int, int]) -> float:  # start-up (about one cheap run's compute) + compute
        return STARTUP + math.prod(cost(d, v) for d, v in picks.items())

    def candidate(start, eager: float = 1.0) -> Optional[Dict[int, int]]:
        """A combination around `start`; each other dimension takes the value covering most new pairs per cost,
        or (with probability 1 - eager) its cheapest allowed value, so some candidates leave expensive values
        for later, cheaper combinations."""
        picks = dict(start)
        for d in rng.sample(range(len(dims)), len(dims)):
            if d in picks:
                continue
            scored = []
            for v in range(len(dims[d].values)):
                mine = [((e, w), (d, v)) if e < d else ((d, v), (e, w)) for e, w in picks.items()]
                if (d, v) in bad_value or any(p in bad_pairs for p in mine):
                    continue
                gain = sum(p in uncovered for p in mine)
                scored.append((-gain / cost(d, v), cost(d, v), rng.random(), v))
            if not scored:
                return None
            picks[d] = min(scored)[3] if rng.random() < eager else min(scored, key=lambda t: (t[1], t[2]))[3]
        return picks

    out: List[Tuple[Dict[int, int], bool]] = []
    uncovered, dead = set(good), set()
    while uncovered - dead:
        open_pairs = sorted(uncovered - dead)
        found = [c for c in (candidate(rng.choice(open_pairs), eager) for eager in (1.0, 0.7, 0.4) * (candidates // 3))
                 if c is not None]
        found.sort(key=lambda c: (-len(pairs_of(c) & uncovered) / total_cost(c), total_cost(c)))
        chosen = next((c for c in found if len(pairs_of(c) & uncovered) > 0
                       and oracle.refusal(_merge(dims, c)) is None), None)
        if chosen is None:  # no accepted combination around these pairs: try them alone, else give them up
            pair = open_pairs[0]
            alone = candidate(pair)
            if alone is None or oracle.refusal(_merge(dims, alone)) is not None:
                dead.add(pair)
                continue
            chosen = alone
        out.append((chosen, True))
        uncovered -= pairs_of(chosen)
    # refused: each refused pair (and each value refused alone) beside the base combination, one at a time, so
    # each refusal's message is seen and must name one of the two keys
    for x, y in sorted(bad_pairs | {(x, x) for x in bad_value}):
        picks = dict(base)
        picks.update([x, y])
        out.append((picks, False))
    return out, dead


def estimated_cost(combos: List["Combination"], device_type: str = "cpu") -> float:
    """The matrix's cost in units of one cheap 1-rank run (COST's product per accepted combination)."""
    costs = {**COST, **(CPU_COST if device_type == "cpu" else {})}
    return sum(STARTUP + math.prod(costs.get(item, 1.0) for item in c.picks.items()) for c in combos
               if c.expected == "trains")


def combinations(seed: int = 0, only: Optional[Sequence[str]] = None,
                 device_type: Optional[str] = None) -> List[Combination]:
    """The matrix for `seed` and the dimensions named in `only` (all by default) on `device_type` (this machine's
    by default): accepted combinations first, then the refused ones."""
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dims = dimensions(only)
    oracle = _ORACLES.setdefault(device_type, Oracle(device_type))  # the checks' answers do not change in a process
    out = []
    array, dead = covering_array(dims, seed, oracle)
    if dead:
        names = sorted(f"{dims[a].name}={dims[a].values[va][0]} & {dims[b].name}={dims[b].values[vb][0]}"
                       for (a, va), (b, vb) in dead)
        raise AssertionError(f"pairs the config accepts but no accepted combination holds: {names}")
    for index, (picks, accepted) in enumerate(array):
        named = {dims[d].name: dims[d].values[v][0] for d, v in sorted(picks.items())}
        patch = _merge(dims, picks)
        expected = "refused" if oracle.refusal(patch) is not None else "trains"
        assert (expected == "trains") == accepted
        focus = tuple(k for d, v in sorted(picks.items()) if v != 0 for k in _keys(dims[d].values[v][1]))
        out.append(Combination(index, named, patch, expected, world=int(named.get("world", "1")),
                               entry=named.get("entry", "run"), focus=focus if not accepted else ()))
    return out


def covered_pairs(combos: List[Combination]) -> Dict[Tuple[str, str], set]:
    """{(dimension a, dimension b): {(value a, value b), ...}} over all combinations (for the coverage test)."""
    out: Dict[Tuple[str, str], set] = {}
    for c in combos:
        for (a, va), (b, vb) in itertools.combinations(sorted(c.picks.items()), 2):
            out.setdefault((a, b), set()).add((va, vb))
    return out


# ---- running one combination -----------------------------------------------------------------------------------

def write_data(root: Path) -> Path:
    """The matrix's datasets under `root`: a small demo set of 16 identities (its rec also serves source
    recordio) and a folder of 8 identities x 2 JPEGs, so a quarter of the classes is still more than one.
    Returns `root`."""
    import numpy as np
    from PIL import Image

    from dali_pipes.make_demo import make_demo

    if not (root / "demo" / "train.rec").exists():
        make_demo(root / "demo", identities=16, images_per_identity=3, eval_identities=2,
                  eval_images_per_identity=2, eval_pairs=2, workers=1)
    folder = root / "folder"
    if not folder.exists():
        rng = np.random.default_rng(0)
        for identity in range(8):
            (folder / f"id{identity}").mkdir(parents=True)
            for k in range(2):
                pixels = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"id{identity}" / f"{k}.jpg", quality=85)
    return root


def entry_args(combo: Combination, config: Path) -> Tuple[str, List[str]]:
    """The combination's entry point ("run" for run.py, "profile" for engine.profile) and its arguments."""
    args = ["--config", str(config)] + (["--warmup", "1", "--steps", str(STEPS - 1)] if combo.entry == "profile"
                                        else [])
    return ("profile" if combo.entry == "profile" else "run"), args


def verdict(returncode: Optional[int], output: str, out_dir: Path, combo: Combination) -> Tuple[str, str]:
    """("trains" | "refused" | "failed", why) for a finished (or, returncode None, timed out) run."""
    if returncode is None:
        return "failed", f"hang: no exit within {TIMEOUT_S:.0f} s"
    if "Traceback (most recent call last)" in output:
        return "failed", f"exit {returncode} with a traceback"
    if returncode == 0:
        summary = out_dir / "summary.json"
        if not summary.is_file():
            return "failed", "exit 0 without summary.json"
        loss = json.loads(summary.read_text()).get("final_loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return "failed", f"final_loss {loss!r} is not finite"
        return "trains", f"final_loss {loss:.4f}"
    if returncode == 2:
        lines = [ln for ln in output.splitlines() if ln.startswith("config error: ")]
        distinct = sorted(set(ln.split("] ", 1)[-1] for ln in lines))
        if len(distinct) != 1:
            return "failed", f"exit 2 with {len(distinct)} distinct 'config error:' lines"
        named = set(combo.focus or _keys(combo.patch))
        message = distinct[0]
        if not any(re.search(rf"\b{re.escape(k)}\b", message) for k in named):
            return "failed", f"refusal names no key the combination sets: {message}"
        return "refused", message
    return "failed", f"exit {returncode}"


def _keys(patch: Dict[str, Any]) -> List[str]:
    out = []
    for key, value in patch.items():
        if isinstance(value, dict) and "." not in key:  # a top-level block: its own keys too
            out += [f"{key}.{k}" for k in value] + [key]
        else:
            out.append(key)
    return out


def _write_config(combo: Combination, work: Path, data_dir: Path) -> Tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    raw = config_for(combo.patch, str(data_dir))
    raw["engine"]["train"]["output_dir"] = str(out_dir)
    config = work / "config.json"
    config.write_text(json.dumps(raw, indent=1))
    return config, out_dir


class _PassedTheChecks(Exception):
    """Raised in place of the first step after the config checks of an in-process run."""


def run_in_process(combo: Combination, work: Path, data_dir: Path) -> Tuple[str, str, float, float]:
    """A combination the config checks refuse, through the real entry point's main() in this process (run.py or
    engine.profile: no interpreter and import start-up). Should the checks let it pass, it is stopped at the first
    step after them (installing the stop handlers, before any process group) and fails."""
    import contextlib
    import importlib
    import io

    from engine.runtime import faults

    config, out_dir = _write_config(combo, work, data_dir)
    main = importlib.import_module("engine.profile" if combo.entry == "profile" else "run").main
    argv = ["--config", str(config)] + (["--warmup", "1", "--steps", str(STEPS - 1)] if combo.entry == "profile"
                                        else [])
    stderr, start, cpu = io.StringIO(), time.monotonic(), time.process_time()

    def passed(*args, **kwargs):
        raise _PassedTheChecks()

    saved, faults.install_stop_handlers = faults.install_stop_handlers, passed
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
            rc: Optional[int] = main(argv)
    except _PassedTheChecks:
        return "failed", "passed the config checks (it would have started)", time.monotonic() - start, 0.0
    finally:
        faults.install_stop_handlers = saved
    (work / "log.txt").write_text(stderr.getvalue())
    kind, why = verdict(rc, stderr.getvalue(), out_dir, combo)
    return kind, why, time.monotonic() - start, time.process_time() - cpu


def run(combo: Combination, work: Path, data_dir: Path, *, port: int,
        server: ForkServer) -> Tuple[str, str, float, float]:
    """Run `combo` through its entry point in processes forked by `server` (1 rank as `python run.py` would run,
    2 ranks with what the deepspeed launcher gives its ranks) in `work` (config.json, out/, log.txt); returns
    (verdict, why, wall seconds, CPU seconds of its ranks)."""
    config, out_dir = _write_config(combo, work, data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    log = work / "log.txt"
    log.write_text("")
    start = time.monotonic()
    entry, args = entry_args(combo, config)
    rc, cpu = server.run(entry, args, world=combo.world, env=env, cwd=ROOT, log=log, timeout=TIMEOUT_S, port=port)
    kind, why = verdict(rc, log.read_text(errors="replace"), out_dir, combo)
    return kind, why, time.monotonic() - start, cpu


def run_many(combos: List[Combination], work: Path, data_dir: Path,
             slots: int = 2) -> Dict[int, Tuple[str, str, float, float]]:
    """Run `combos`: those the config checks refuse in this process (run_in_process), the others in processes
    forked by one `ForkServer` (torch and deepspeed imported once), at most `slots` ranks at once (a 2-rank combination takes 2). Returns {index: (verdict, why, wall s,
    CPU s)}."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from engine.runtime.dist import find_free_port

    results: Dict[int, Tuple[str, str, float, float]] = {}
    for c in combos:
        if c.expected == "refused":
            results[c.index] = run_in_process(c, work / f"c{c.index:02d}", data_dir)
    pending = sorted((c for c in combos if c.expected != "refused"), key=lambda c: -c.world)  # big ones first
    running: Dict[Any, Combination] = {}
    with ForkServer() as server, ThreadPoolExecutor(max_workers=slots) as pool:
        while pending or running:
            busy = sum(min(c.world, slots) for c in running.values())
            started = False
            for c in list(pending):
                if busy + min(c.world, slots) <= slots:
                    fut = pool.submit(run, c, work / f"c{c.index:02d}", data_dir, port=find_free_port(),
                                      server=server)
                    running[fut] = c
                    pending.remove(c)
                    busy += min(c.world, slots)
                    started = True
            if not started or not pending:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    results[running.pop(fut).index] = fut.result()
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(os.environ.get("ARCSCALE_MATRIX_SEED", "0")))
    parser.add_argument("--dims", default=os.environ.get("ARCSCALE_MATRIX_DIMS", ""),
                        help="comma-separated dimension names (default: all)")
    parser.add_argument("--run", default=None, help="run these combination indices (e.g. 3,12) or 'all'")
    parser.add_argument("--out", default="/tmp/arcscale_matrix", help="work folder for --run")
    args = parser.parse_args(argv)
    combos = combinations(args.seed, [d for d in args.dims.split(",") if d] or None)
    if args.run is None:
        for c in combos:
            print(c.describe())
        print(f"{len(combos)} combinations ({sum(c.expected == 'trains' for c in combos)} train, "
              f"{sum(c.world == 2 for c in combos)} on 2 ranks; estimated cost {estimated_cost(combos):.0f} "
              f"cheap 1-rank runs)")
        return 0
    chosen = combos if args.run == "all" else [combos[int(i)] for i in args.run.split(",")]
    out = Path(args.out)
    data = write_data(out / "data")
    start = time.monotonic()
    results = run_many(chosen, out, data)
    bad = 0
    for c in chosen:
        kind, why, seconds, cpu = results[c.index]
        ok = kind == c.expected
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} c{c.index:02d} {kind:8s} {seconds:6.1f}s {cpu:6.1f} cpu-s {why[:140]}")
    cpu = sum(r[3] for r in results.values())
    print(f"{len(chosen) - bad}/{len(chosen)} as expected in {time.monotonic() - start:.0f} s wall, {cpu:.0f} CPU "
          f"seconds (logs: {out}/cNN/log.txt)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
