"""Start-up time of the command line: ``dicom-node --help``, ``status``, ``queue``, ``jobs`` in fresh processes.

Each command runs ``--repeat`` times, each time in a new process, with the commands interleaved round by round
(the order rotates) so that a change in machine load hits all of them alike. Beside them run the floor (``python
-c pass``: the interpreter alone, with this environment's site-packages) and two peers a PACS administrator
already uses: DCMTK's ``echoscu --version`` (a C++ tool) and ``python -m pynetdicom --version`` (a Python DICOM
tool). The read-only commands read a real, empty index (made once, in a temporary folder, as the node makes it).
Compiled modules are cached as an installed package has them (``PYTHONPYCACHEPREFIX`` in the temporary folder,
also when ``PYTHONDONTWRITEBYTECODE`` is set here): the warm-up run writes them.

Prints the median and minimum wall time of each command, its median minus the floor's (what the command itself
costs), the ratio of medians to the floor, and the median CPU time (user + system) of the process: on a busy
machine wall time includes waiting for a core, CPU time much less so. And the load average before and after. With ``--markdown`` the
table is written for docs/benchmarks.md. No threshold: a person judges (the issue's target: under 0.5 s).
``--compare DIR`` also runs the same commands from another tree of the node (e.g. an older commit, unpacked
with ``git archive``), as ``python -m node`` there, in the same rounds.

    python scripts/bench/bench_cli_startup.py --repeat 20
    git archive 9eb67ff | tar -x -C /tmp/before && python scripts/bench/bench_cli_startup.py --compare /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import report

REPO = Path(__file__).resolve().parents[2]
ECHOSCU = "/usr/bin/echoscu"  # by full path: pynetdicom's console scripts shadow DCMTK's on PATH


def node_command() -> list[str]:
    """How to start the command line: the installed ``dicom-node`` script when it works here, else ``python -m node``."""
    script = shutil.which("dicom-node")
    if script:
        ok = subprocess.run([script, "--version"], capture_output=True, text=True, cwd=REPO)
        if ok.returncode == 0:
            return [script]
    return [sys.executable, "-m", "node"]


def make_site(folder: Path) -> Path:
    """A config and an empty index made as the node makes it (migrated), for the commands that read the index."""
    sys.path.insert(0, str(REPO))
    from node.config import load_config
    from node.index.db import make_engine, migrate

    config = folder / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{folder / "data"}"\n')
    (folder / "data").mkdir()
    engine = make_engine(load_config(config, environ={}).database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return config


#: Command lines as timed: the words and the folder they run in (None: this repository).
Cmd = tuple[list[str], Path | None]


def node_commands(node: list[str], config: Path, label: str = "", cwd: Path | None = None) -> dict[str, Cmd]:
    return {
        f"{label}dicom-node --version": ([*node, "--version"], cwd),
        f"{label}dicom-node --help": ([*node, "--help"], cwd),
        f"{label}dicom-node status": ([*node, "status", "--config", str(config)], cwd),
        f"{label}dicom-node queue": ([*node, "queue", "--config", str(config)], cwd),
        f"{label}dicom-node jobs": ([*node, "jobs", "--config", str(config)], cwd),
    }


def commands(config: Path, compare: Path | None, label: str) -> dict[str, Cmd]:
    cmds: dict[str, Cmd] = {"python -c pass (floor)": ([sys.executable, "-c", "pass"], None)}
    cmds.update(node_commands(node_command(), config))
    if compare is not None:  # python -m node run in that tree imports its node package (the folder is first)
        cmds.update(node_commands([sys.executable, "-m", "node"], config, f"{label}: ", compare))
    cmds["python -m pynetdicom --version"] = ([sys.executable, "-m", "pynetdicom", "--version"], None)
    if Path(ECHOSCU).exists():
        cmds["DCMTK echoscu --version"] = ([ECHOSCU, "--version"], None)
    return cmds


#: Where the commands' compiled modules are cached (set by main to a temporary folder).
PYCACHE: Path | None = None


def time_once(cmd: Cmd) -> tuple[float, float]:
    """Wall seconds from starting the process to its exit, and the CPU seconds it used; a failure stops the run."""
    words, cwd = cmd
    env = dict(os.environ)
    if PYCACHE is not None:  # as installed: modules compiled once, not at every start
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    if cwd is not None:  # that tree's SDK too (an installed SDK is this tree's)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), str(cwd / "sdk" / "src"), env.get("PYTHONPATH")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(words, capture_output=True, cwd=cwd or REPO, env=env, timeout=120)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # one child at a time: the difference is this one's
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        sys.exit(f"{' '.join(words)} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, cpu


def measure(cmds: dict[str, Cmd], repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each command, ``repeat`` times, round by round in a rotating order."""
    names = list(cmds)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # one warm-up each: the page cache holds the files of every command alike
        time_once(cmds[name])
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            w, c = time_once(cmds[name])
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20, help="Fresh processes per command (default 20).")
    ap.add_argument("--markdown", action="store_true", help="Print the table as Markdown.")
    ap.add_argument("--json", type=Path, help="Also write every measured time here.")
    ap.add_argument("--compare", type=Path, help="Another tree of the node to time alike (python -m node there).")
    ap.add_argument("--label", default="before", help="The other tree's name in the table (default: before).")
    args = ap.parse_args(argv)

    global PYCACHE
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        PYCACHE = Path(tmp) / "pycache"
        cmds = commands(make_site(Path(tmp)), args.compare, args.label)
        times, cpu = measure(cmds, args.repeat)
    load_after = os.getloadavg()

    floor = times["python -c pass (floor)"]
    floor_med = report.median(floor) or 0.0
    rows = []
    for name, ts in times.items():
        med = report.median(ts) or 0.0
        ratio = report.ratio(ts, floor)
        rows.append(
            [
                name,
                f"{med * 1000:.0f}",
                f"{min(ts) * 1000:.0f}",
                "-" if ts is floor else f"{(med - floor_med) * 1000:.0f}",
                "n/a" if ratio is None else f"{ratio:.1f}",
                f"{(report.median(cpu[name]) or 0.0) * 1000:.0f}",
            ]
        )
    header = ["command", "median ms", "min ms", "median - floor ms", "x floor", "CPU ms"]
    print(f"node started as: {' '.join(node_command())}")
    print(
        f"{args.repeat} fresh processes per command, interleaved; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(report.table(rows, header, markdown=args.markdown))
    if args.json:
        args.json.write_text(
            json.dumps({"times": times, "cpu": cpu, "load_before": load_before, "load_after": load_after}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
