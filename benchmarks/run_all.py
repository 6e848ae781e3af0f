#!/usr/bin/env python3
"""Run every benchmark (`make bench`); each prints its own figures and the ratio to its named baseline.

    python benchmarks/run_all.py            # all, at the issue-sized defaults
    python benchmarks/run_all.py --quick    # smaller inputs, for a smoke run (minutes, not tens)
Figures and the exact commands are recorded in docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (full-size arguments, quick arguments)
BENCHMARKS: Dict[str, tuple] = {
    "preprocess_throughput.py": ([], ["--repeats", "1"]),
    "gpt_index_build.py": ([], ["--num-documents", "200000", "--num-tokens", "400000000", "--repeats", "2"]),
    "sample_reads.py": ([], ["--num-documents", "50000", "--num-tokens", "100000000", "--num-reads", "5000"]),
    "train_throughput.py": ([], ["--quick"]),
    "parallel_memory.py": ([], ["--quick"]),
    "convert_memory.py": ([], ["--quick"]),
    "dedup.py": ([], ["--quick"]),
    "generate.py": ([], ["--quick"]),
}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    failures = []
    for name, (full, quick) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, os.path.join(HERE, name), *(quick if args.quick else full)]
        print(f"\n### {' '.join(command)}", flush=True)
        started = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failures.append(name)
        print(f"### {name}: {time.perf_counter() - started:.0f}s", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
