"""The parallel engine of `megalign preprocess`: work units, worker processes, partial datasets.

The input is cut into contiguous work units (byte ranges at line starts of plain files; whole
compressed files, or line ranges of them when there are fewer files than workers). Each worker
process reads its units itself, tokenizes records in batches and writes one partial dataset per
unit and JSON key (with --sft: per unit, a tokens and a loss-mask dataset, see megalign.data.sft);
megalign.data.preprocess merges them in unit order, so the result does not depend on the number of
workers. Only small messages (units, progress counts, results) cross processes.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import queue
import signal
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import numpy

from megalign.data.fast_bpe import byte_level_bpe_encoder
from megalign.data.indexed_dataset import IndexedDatasetBuilder
from megalign.data.jsonl import RecordProblem, compression_of, count_lines, is_blank, iter_lines, parse_record
from megalign.data.sft import LOSS_MASK_SUFFIX, SFT_KEY, conversation_from_record, tokenize_conversations
from megalign.data.tokenizers import Tokenizer, build_tokenizer
from megalign.errors import BadRecordError, ConfigError, DataFormatError, MegalignError, TokenizerError
from megalign.utils.progress import ProgressMeter

_BATCH_DOCS = 512  # records tokenized per encode_batch call ...
_BATCH_BYTES = 4 << 20  # ... or fewer when they hold this much JSONL
_MIN_CHUNK = 1 << 20  # byte ranges of plain files: at least this large ...
_MAX_CHUNK = 256 << 20  # ... at most this large ...
_UNITS_PER_WORKER = 4  # ... and about this many per worker (load balance)
_COUNT_CHUNK = 1 << 22  # bytes read at a time when counting newlines
_POLL_SECONDS = 0.2
MAX_EXAMPLES = 5  # bad lines kept (with their location) for the summary


# --------------------------------------------------------------------------------------------------
# Work plan: which worker tokenizes which part of which file
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkUnit:
    """A contiguous part of one input file, tokenized by one worker into one partial dataset.

    Plain files: [start, stop) are byte offsets at line starts. Compressed files (by_lines): [start,
    stop) are 0-based line indices, stop -1 meaning the end of the file. `weight` is the share of
    the file on disk, for progress and ETA.
    """

    index: int
    path: str
    start: int
    stop: int
    by_lines: bool
    weight: int


def _line_starts(path: str, size: int, chunk: int) -> List[int]:
    """Byte offsets, about `chunk` apart, at which lines of a plain file start (first 0, last `size`)."""
    bounds = [0]
    with open(path, "rb") as handle:
        for target in range(chunk, size, chunk):
            if target <= bounds[-1]:
                continue
            handle.seek(target - 1)
            handle.readline()  # up to and including the newline that ends the line holding target - 1
            position = handle.tell()
            if bounds[-1] < position < size:
                bounds.append(position)
    bounds.append(size)
    return bounds


def _count_lines_of(paths: List[str]) -> List[int]:
    """count_lines of each path, in this process."""
    return [count_lines(path) for path in paths]


def plan_units(
    paths: Sequence[str],
    workers: int,
    chunk_bytes: Optional[int] = None,
    line_counter: Callable[[List[str]], List[int]] = _count_lines_of,
) -> List[WorkUnit]:
    """Split the inputs into work units, in input order.

    Plain files are cut into byte ranges of `chunk_bytes` (default: the plain bytes over
    4 x workers, within 1 MiB..256 MiB). A compressed file is one unit, unless there are fewer
    compressed files than workers: then each is cut into line ranges (after counting its lines).
    """
    sizes = {path: os.path.getsize(path) for path in paths}
    plain_total = sum(size for path, size in sizes.items() if compression_of(path) is None)
    if chunk_bytes is None:
        chunk_bytes = min(_MAX_CHUNK, max(_MIN_CHUNK, plain_total // (workers * _UNITS_PER_WORKER) + 1))
    compressed = [path for path in paths if compression_of(path) is not None]
    pieces = math.ceil(workers / len(compressed)) if compressed and len(compressed) < workers else 1
    line_counts = dict(zip(compressed, line_counter(compressed))) if pieces > 1 else {}
    units: List[WorkUnit] = []

    def add(path: str, start: int, stop: int, by_lines: bool, weight: int) -> None:
        units.append(WorkUnit(len(units), path, start, stop, by_lines, weight))

    for path in paths:
        size = sizes[path]
        if compression_of(path) is None:
            bounds = _line_starts(path, size, max(1, chunk_bytes))
            for start, stop in zip(bounds, bounds[1:]):
                add(path, start, stop, False, stop - start)
        elif pieces == 1 or line_counts[path] < 2 * pieces:
            add(path, 0, -1, True, size)
        else:
            lines = line_counts[path]
            cuts = [lines * i // pieces for i in range(pieces + 1)]
            weights = [size * i // pieces for i in range(pieces + 1)]
            for i in range(pieces):
                add(path, cuts[i], -1 if i == pieces - 1 else cuts[i + 1], True, weights[i + 1] - weights[i])
    return units


# --------------------------------------------------------------------------------------------------
# Worker side: read a unit, tokenize in batches, write a partial dataset
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """What every worker needs; the tokenizer is rebuilt from (type, model, vocab size) in each."""

    tokenizer_type: str
    tokenizer_model: Optional[str]
    vocab_size: Optional[int]
    json_keys: Tuple[str, ...]
    append_eod: bool
    skip_bad_records: bool
    work_dir: str
    dtype: str
    sft: bool = False  # records are conversations (megalign.data.sft): tokens and a loss mask, no json_keys

    def part_dtypes(self) -> Dict[str, str]:
        """The partial datasets of each unit: part key -> dtype name (SFT: tokens and a uint8 loss mask)."""
        if self.sft:
            return {SFT_KEY: self.dtype, SFT_KEY + LOSS_MASK_SUFFIX: "uint8"}
        return dict.fromkeys(self.json_keys, self.dtype)


@dataclass
class BadLine:
    """A bad line as a worker sees it: plain files know its byte offset, compressed ones its line."""

    path: str
    offset: Optional[int]
    line: Optional[int]
    reason: str
    detail: str


@dataclass
class UnitResult:
    """What a worker reports for one unit (its partial datasets are at part_prefix(work_dir, index, key))."""

    index: int
    documents: int = 0
    input_bytes: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    empty: Dict[str, int] = field(default_factory=dict)
    bad_counts: Dict[str, int] = field(default_factory=dict)
    bad_examples: List[BadLine] = field(default_factory=list)
    fatal: Optional[BadLine] = None
    loss_tokens: int = 0  # SFT: tokens with loss mask 1
    fast_path: bool = False  # tokenized by megalign.data.fast_bpe rather than the tokenizer's encode_batch


def part_prefix(work_dir: str, index: int, key: str) -> str:
    """Where a unit's partial dataset for one key is written."""
    return os.path.join(work_dir, f"part-{index:06d}_{key}")


class _UnitReader:
    """Iterates (byte offset or None, line number or None, raw line) over one unit; tracks disk bytes."""

    def __init__(self, unit: WorkUnit) -> None:
        self.unit = unit
        self._consumed: Callable[[], int] = lambda: 0

    def consumed(self) -> int:
        """Bytes of the file on disk behind the lines read so far (at most the unit's weight)."""
        return min(self.unit.weight, self._consumed())

    def __iter__(self) -> Iterator[Tuple[Optional[int], Optional[int], bytes]]:
        unit = self.unit
        if not unit.by_lines:
            position = unit.start
            self._consumed = lambda: position - unit.start
            with open(unit.path, "rb", buffering=1 << 20) as handle:
                handle.seek(unit.start)
                for raw in handle:
                    offset, position = position, position + len(raw)
                    yield offset, None, raw
                    if position >= unit.stop:
                        break
            return
        stop = None if unit.stop < 0 else unit.stop
        with open(unit.path, "rb") as source:
            lines = iter_lines(unit.path, source=source)
            next(itertools.islice(lines, unit.start, unit.start), None)  # skip the lines before start
            base = source.tell()
            self._consumed = lambda: source.tell() - base
            count = unit.start
            for line_number, raw in lines:
                yield None, line_number, raw
                count += 1
                if stop is not None and count >= stop:
                    break


def batch_encoder(tokenizer: Tokenizer) -> Callable[[Sequence[str]], List[List[int]]]:
    """The fastest exact encode_batch for `tokenizer`: megalign.data.fast_bpe for byte-level BPE
    tokenizer.json files it reproduces, else the tokenizer's own encode_batch."""
    if tokenizer.tokenizer_type == "HuggingFaceTokenizer" and tokenizer.model_path:
        fast = byte_level_bpe_encoder(tokenizer.model_path)
        if fast is not None:
            return fast.encode_batch
    return tokenizer.encode_batch


class _Fatal(Exception):
    """Unwinds a unit at a line that stops the run (carried in UnitResult.fatal)."""


class _Batch:
    """Records waiting to be tokenized, with where each came from."""

    def __init__(self) -> None:
        self.records: List[Any] = []  # dicts, or conversations with --sft
        self.locations: List[Tuple[Optional[int], Optional[int]]] = []
        self.bytes = 0


class _UnitProcessor:
    """Tokenizes work units; one per worker process (or one in the main process with --workers 1)."""

    def __init__(self, job: Job, report: Callable[[Dict[str, float]], None]) -> None:
        self.job = job
        self.report = report
        self.tokenizer: Tokenizer = build_tokenizer(job.tokenizer_type, job.tokenizer_model, vocab_size=job.vocab_size)
        self.encode_batch = batch_encoder(self.tokenizer)
        self.fast_path = self.encode_batch != self.tokenizer.encode_batch

    def run(self, unit: WorkUnit) -> UnitResult:
        """Tokenize one unit into its partial datasets (one per key); stop at a bad line unless skipping."""
        job = self.job
        parts = job.part_dtypes()
        result = UnitResult(
            unit.index, tokens=dict.fromkeys(parts, 0), empty=dict.fromkeys(parts, 0), fast_path=self.fast_path
        )
        builders = {
            key: IndexedDatasetBuilder(part_prefix(job.work_dir, unit.index, key), dtype)
            for key, dtype in parts.items()
        }
        reader = _UnitReader(unit)
        batch = _Batch()
        reported = 0
        try:
            for offset, line_number, raw in reader:
                result.input_bytes += len(raw)
                batch.bytes += len(raw)
                if is_blank(raw):
                    continue
                try:
                    record = parse_record(raw, job.json_keys)
                    batch.records.append(conversation_from_record(record) if job.sft else record)
                    batch.locations.append((offset, line_number))
                except RecordProblem as problem:
                    self._bad_line(result, BadLine(unit.path, offset, line_number, problem.reason, problem.detail))
                if len(batch.records) >= _BATCH_DOCS or batch.bytes >= _BATCH_BYTES:
                    reported = self._flush(unit, batch, builders, result, reader.consumed(), reported)
                    batch = _Batch()
            self._flush(unit, batch, builders, result, unit.weight, reported)
            for builder in builders.values():
                builder.finalize()
        except _Fatal:
            for builder in builders.values():
                builder.abort()
        except BaseException:
            for builder in builders.values():
                builder.abort()
            raise
        return result

    def _bad_line(self, result: UnitResult, bad: BadLine) -> None:
        if not self.job.skip_bad_records:
            result.fatal = bad
            raise _Fatal()
        result.bad_counts[bad.reason] = result.bad_counts.get(bad.reason, 0) + 1
        if len(result.bad_examples) < MAX_EXAMPLES:
            result.bad_examples.append(bad)

    def _encode(
        self,
        unit: WorkUnit,
        batch: _Batch,
        result: UnitResult,
        what: str,
        items: List[Any],
        encode_many: Callable[[List[Any]], List[Any]],
    ) -> List[Any]:
        """encode_many(items); an item the tokenizer refuses stops the run, named by FILE:LINE and `what`."""
        try:
            return encode_many(items) if items else []
        except TokenizerError:
            for item, (offset, line_number) in zip(items, batch.locations):
                try:
                    encode_many([item])
                except TokenizerError as error:
                    result.fatal = BadLine(unit.path, offset, line_number, "tokenizer_error", f"{what}: {error}")
                    raise _Fatal() from None
            raise

    def _flush(
        self,
        unit: WorkUnit,
        batch: _Batch,
        builders: Dict[str, IndexedDatasetBuilder],
        result: UnitResult,
        consumed: int,
        reported: int,
    ) -> int:
        """Tokenize a batch into the builders and report progress; returns the disk bytes reported so far."""
        tokens = (self._write_sft if self.job.sft else self._write_keys)(unit, batch, builders, result)
        result.documents += len(batch.records)
        self.report(
            {"in_bytes": consumed - reported, "docs": len(batch.records), "tokens": tokens, "bytes": batch.bytes}
        )
        return consumed

    def _write_keys(
        self, unit: WorkUnit, batch: _Batch, builders: Dict[str, IndexedDatasetBuilder], result: UnitResult
    ) -> int:
        """One document per record in each key's dataset; returns the tokens written."""
        tokens = 0
        for key, builder in builders.items():
            encoded = self._encode(
                unit, batch, result, f"key '{key}'", [record[key] for record in batch.records], self.encode_batch
            )
            if self.job.append_eod:  # Megatron: EOD only after documents that have tokens
                eod = self.tokenizer.eod
                for ids in encoded:
                    if ids:
                        ids.append(eod)
            total = sum(len(ids) for ids in encoded)
            flat = numpy.fromiter(itertools.chain.from_iterable(encoded), dtype=builder.dtype, count=total)
            start = 0
            for ids in encoded:
                if ids:
                    builder.add_document(flat[start : start + len(ids)])
                    start += len(ids)
                else:  # as Megatron: an empty document (no sequence) keeps record i = document i in every key
                    builder.add_document(flat[:0], lengths=())
                    result.empty[key] += 1
            result.tokens[key] += total
            tokens += total
        return tokens

    def _write_sft(
        self, unit: WorkUnit, batch: _Batch, builders: Dict[str, IndexedDatasetBuilder], result: UnitResult
    ) -> int:
        """One conversation per record: its tokens and, with the same length, its loss mask."""
        encoded = self._encode(
            unit,
            batch,
            result,
            "conversation",
            batch.records,
            lambda items: tokenize_conversations(self.tokenizer, items, self.encode_batch),
        )
        tokens_builder, mask_builder = builders[SFT_KEY], builders[SFT_KEY + LOSS_MASK_SUFFIX]
        tokens = 0
        for ids, mask in encoded:
            tokens_builder.add_document(numpy.asarray(ids, dtype=tokens_builder.dtype))
            mask_builder.add_document(numpy.asarray(mask, dtype=numpy.uint8))
            tokens += len(ids)
            result.loss_tokens += sum(mask)
        result.tokens[SFT_KEY] += tokens
        result.tokens[SFT_KEY + LOSS_MASK_SUFFIX] += tokens
        return tokens


def _describe_failure(error: BaseException) -> Tuple[str, str, str]:
    """(class name, message, traceback) of an exception, to send from a worker as plain strings."""
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return type(error).__name__, str(error), trace


def _rebuild_failure(name: str, message: str, trace: str) -> BaseException:
    """The main-process exception for a worker's failure: user errors keep their class and message."""
    user_errors = {
        cls.__name__: cls for cls in (MegalignError, DataFormatError, BadRecordError, ConfigError, TokenizerError)
    }
    if name in user_errors:
        return user_errors[name](message)
    return RuntimeError(f"preprocess worker failed:\n{trace}")


def _worker_main(job: Job, tasks, events) -> None:
    """A worker process: build the tokenizer once, then run tasks until the None sentinel.

    Tasks are ("count", path) and ("unit", WorkUnit); events are ("progress", counts),
    ("counted", path, lines), ("done", index, UnitResult) and ("error", name, message, traceback).
    One thread per process for batched encoding: the processes are the parallelism.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the workers
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        processor = _UnitProcessor(job, lambda counts: events.put(("progress", counts)))
        for kind, payload in iter(tasks.get, None):
            if kind == "count":
                events.put(("counted", payload, count_lines(payload)))
            else:
                events.put(("done", payload.index, processor.run(payload)))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the main process
        events.put(("error", *_describe_failure(error)))


class _WorkerPool:
    """Spawned worker processes fed from one task queue.

    Unlike multiprocessing.Pool, a worker that dies (killed, out of memory, failing to start) fails
    the run at once instead of being replaced forever, and stop() terminates the others.
    """

    def __init__(self, job: Job, workers: int) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
        self.tasks = context.Queue()
        self.events = context.Queue()
        self.processes = [
            context.Process(
                target=_worker_main, args=(job, self.tasks, self.events), daemon=True, name=f"megalign-preprocess-{i}"
            )
            for i in range(workers)
        ]
        for process in self.processes:
            process.start()

    def submit(self, kind: str, payload: object) -> None:
        self.tasks.put((kind, payload))

    def gather(
        self, count: int, on_progress: Callable[[Dict[str, float]], None], on_event: Callable[[tuple], None]
    ) -> None:
        """Pass `count` result events to on_event (progress ones to on_progress); raise a worker's error."""
        while count:
            try:
                event = self.events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                dead = [process for process in self.processes if process.exitcode is not None]
                if not dead:
                    continue
                try:  # a worker that failed cleanly sent its error before exiting: report that one
                    event = self.events.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError(
                        f"preprocess worker {dead[0].name} (pid {dead[0].pid}) exited with code "
                        f"{dead[0].exitcode} before finishing its work (killed, or out of memory?)"
                    ) from None
            if event[0] == "progress":
                on_progress(event[1])
            elif event[0] == "error":
                raise _rebuild_failure(*event[1:])
            else:
                on_event(event)
                count -= 1

    def count_lines(self, paths: List[str]) -> List[int]:
        """count_lines of each path, computed by the workers in parallel."""
        counts: Dict[str, int] = {}
        for path in paths:
            self.submit("count", path)
        self.gather(len(paths), lambda _: None, lambda event: counts.__setitem__(event[1], event[2]))
        return [counts[path] for path in paths]

    def close(self) -> None:
        """Let the workers finish (after all results arrived) and join them."""
        for _ in self.processes:
            self.tasks.put(None)
        for process in self.processes:
            process.join(timeout=30)

    def stop(self) -> None:
        """Terminate any worker still running (after a failure; harmless after close())."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join()
        for channel in (self.tasks, self.events):
            channel.close()
            channel.cancel_join_thread()


# --------------------------------------------------------------------------------------------------
# Main-process side
# --------------------------------------------------------------------------------------------------
def line_number_at(path: str, offset: int) -> int:
    """1-based number of the line of a plain file that starts at byte `offset`."""
    newlines, remaining = 0, offset
    with open(path, "rb") as handle:
        while remaining > 0:
            block = handle.read(min(remaining, _COUNT_CHUNK))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + 1


def location_of(bad: BadLine) -> str:
    """FILE:LINE of a bad line (counting the newlines before it when the worker knew only its offset)."""
    line = bad.line if bad.line is not None else line_number_at(bad.path, bad.offset or 0)
    return f"{bad.path}:{line}"


def run_units(
    job: Job, paths: List[str], workers: int, chunk_bytes: Optional[int], log_interval: float, progress: bool
) -> List[UnitResult]:
    """Plan and tokenize every unit (in this process for one worker, else in worker processes).

    Returns the results in unit order; raises at the first fatal line (BadRecordError, or
    TokenizerError for a text the tokenizer refuses) or worker failure.
    """

    def start_meter(units: List[WorkUnit]) -> ProgressMeter:
        return ProgressMeter(
            "preprocess", total=sum(u.weight for u in units), unit="in_bytes", interval=log_interval, enabled=progress
        )

    def fail_on(result: UnitResult) -> UnitResult:
        if result.fatal is not None:
            error = TokenizerError if result.fatal.reason == "tokenizer_error" else BadRecordError
            raise error(f"{location_of(result.fatal)}: {result.fatal.detail}")
        return result

    if workers == 1:
        units = plan_units(paths, 1, chunk_bytes)
        meter = start_meter(units)
        processor = _UnitProcessor(job, lambda counts: meter.update(**counts))
        results = [fail_on(processor.run(unit)) for unit in units]
        meter.close()
        return results

    pool = _WorkerPool(job, workers)
    try:
        units = plan_units(paths, workers, chunk_bytes, pool.count_lines)
        meter = start_meter(units)
        for unit in units:
            pool.submit("unit", unit)
        gathered: List[Optional[UnitResult]] = [None] * len(units)

        def store(event: tuple) -> None:
            gathered[event[1]] = fail_on(event[2])

        pool.gather(len(units), lambda counts: meter.update(**counts), store)
        meter.close()
        pool.close()
        return cast(List[UnitResult], gathered)  # one result event per unit: every slot is filled
    finally:
        pool.stop()
