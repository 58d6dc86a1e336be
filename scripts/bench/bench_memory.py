#!/usr/bin/env python3
"""Peak memory of dicom-node while it receives one very large instance.

Why this benchmark exists: the node must stream a data set to disk as it
arrives, never hold it in memory.  The product requirement is that
receiving a 1 GB instance grows the node's resident memory by at most
100 MB.  A regression here (a ``bytes`` join of all fragments, a
``dcmread`` that loads Pixel Data, a buffered copy) would not show up in
the throughput benchmark with small files, but would make a real node with
a few parallel multi-frame senders run out of memory.

What it does:

1. Writes a multi-frame 512x512 16-bit Multi-frame Grayscale Word Secondary
   Capture instance (explicit VR little endian) whose Pixel Data is
   ``--size-mb`` MiB: pydicom writes the header, the Pixel Data element is
   appended frame block by frame block, so generation needs no more memory
   than one block.
2. Starts the node (``python -m node run --config CFG``, fresh data dir),
   reads its idle RSS, sends one small warm-up instance (first-use imports,
   thread pools, SQLite page cache) and reads the RSS again: that is the
   baseline.  The kernel's peak-RSS counter (VmHWM) is then reset
   (``/proc/PID/clear_refs``) so it covers the transfer only.
3. Sends the large file with DCMTK ``storescu`` (TCP_NODELAY=1) while a
   thread samples the node's VmRSS every ``--interval`` seconds; after the
   transfer VmHWM gives the exact peak, which no sampling can miss.
4. Checks that the stored file is the one the index points to and that its
   data set bytes (everything after the File Meta) hash the same as the
   source's, streaming both files.

Usage::

    python scripts/bench/bench_memory.py                 # 1 GiB instance
    python scripts/bench/bench_memory.py --size-mb 64    # quick check

Progress goes to stderr, results to stdout.  Exit status: 0 if the growth
is within ``--limit-mb`` (default 100) and the bytes match, 1 otherwise
(also when the transfer fails), 2 if a required tool is missing.  The work
dir (it holds two copies of the instance) is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sqlite3
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    ECHOSCU,
    STORESCU,
    NodeReceiver,
    ProcessGroup,
    ReceiverUnavailable,
    SeriesSpec,
    _phantom,
    generate_series,
    install_sigterm_handler,
    log,
    machine_info,
    make_workdir,
    missing_binaries,
    rmtree_quiet,
    send_with_storescu,
    set_ct_pixel_module,
    tail,
    tool_versions,
)

#: Multi-frame Grayscale Word Secondary Capture Image Storage: the simplest
#: IOD that legitimately carries thousands of 16-bit frames.
MF_GRAY_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
ROWS = COLS = 512
FRAME_BYTES = ROWS * COLS * 2
#: Frames generated and written per block (32 MiB), bounding generation memory.
FRAMES_PER_BLOCK = 64
MIB = 1 << 20


# --------------------------------------------------------------------------
# The large instance
# --------------------------------------------------------------------------


def write_large_instance(path: Path, size_mb: int, seed: int = 99) -> tuple[str, int]:
    """Write a multi-frame instance whose Pixel Data is about ``size_mb`` MiB.

    Returns (SOP Instance UID, number of frames).  The header is written by
    pydicom (so the File Meta and data set encoding are pydicom's, like any
    real file), then the Pixel Data element (7FE0,0010) OW is appended with
    an explicit length, in blocks of ``FRAMES_PER_BLOCK`` frames.  Frames
    differ from each other (phantom + rotating noise + a per-frame offset),
    so a receiver that mixed up or dropped a block fails the byte check.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    frames = max(1, round(size_mb * MIB / FRAME_BYTES))
    pixel_len = frames * FRAME_BYTES
    if pixel_len >= 0xFFFFFFFF:
        raise ValueError(f"{size_mb} MiB does not fit a 32-bit Pixel Data length")

    sop_class = UID(MF_GRAY_WORD_SC)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    now = _dt.datetime.now()
    date, tm = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = tm
    ds.AccessionNumber = "ACCMEM001"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "dicom-node-bench"
    ds.ReferringPhysicianName = "Referrer^Bench"
    ds.StudyDescription = "Synthetic memory benchmark study"
    ds.SeriesDescription = f"Synthetic multi-frame {frames}x{ROWS}x{COLS}"
    ds.PatientName = "Bench^Memory"
    ds.PatientID = "BENCHMEM01"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00182001  # Page Number Vector
    ds.PageNumberVector = list(range(1, frames + 1))
    set_ct_pixel_module(ds, ROWS, COLS)
    ds.save_as(path, enforce_file_format=True)

    rng = np.random.default_rng(seed)
    base = _phantom(ROWS, COLS)
    noise = [rng.normal(0.0, 20.0, size=(ROWS, COLS)).astype(np.float32) for _ in range(7)]
    with open(path, "ab") as fp:
        # (7FE0,0010) OW, 2 reserved bytes, 32-bit length (PS3.5 7.1.2)
        fp.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_len))
        block = np.empty((FRAMES_PER_BLOCK, ROWS, COLS), dtype="<u2")
        for start in range(0, frames, FRAMES_PER_BLOCK):
            n = min(FRAMES_PER_BLOCK, frames - start)
            for k in range(n):
                i = start + k
                block[k] = np.clip(base + noise[i % len(noise)] + float(i % 97), 0, 4095)
            fp.write(memoryview(block[:n]).cast("B"))
    return str(sop_uid), frames


def dataset_offset(path: Path) -> int:
    """Offset of the first data set byte: after the preamble and the File Meta group.

    Reads (0002,0000) File Meta Information Group Length, which both pydicom
    and the node write as the first meta element (it is required, PS3.10 7.1).
    """
    with open(path, "rb") as fp:
        head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM file with a preamble")
    group, elem, vr, _len, value = struct.unpack("<HH2sHL", head[132:144])
    if (group, elem, vr) != (0x0002, 0x0000, b"UL"):
        raise ValueError(f"{path}: the File Meta does not start with its group length")
    return 144 + value


def dataset_digest(path: Path) -> tuple[str, int]:
    """Hash of the bytes after the File Meta, read in 8 MiB pieces; (hex, byte count)."""
    try:
        import xxhash

        h = xxhash.xxh3_128()
    except ImportError:  # pragma: no cover - xxhash is a node dependency
        h = hashlib.blake2b()
    off = dataset_offset(path)
    n = 0
    with open(path, "rb", buffering=0) as fp:
        fp.seek(off)
        buf = bytearray(8 * MIB)
        view = memoryview(buf)
        while k := fp.readinto(buf):
            h.update(view[:k])
            n += k
    return h.hexdigest(), n


# --------------------------------------------------------------------------
# Memory sampling
# --------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of ``pid`` in KiB (from /proc/PID/status)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith(("Vm", "Rss")):
                key, _, val = line.partition(":")
                parts = val.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pid`` (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fp:
            fp.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Reads the node's VmRSS every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (t, VmRSS KiB, RssAnon KiB)
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        nxt = time.perf_counter()
        while not self._halt.is_set():
            try:
                st = proc_status(self.pid)
            except OSError:
                return  # the node died; reported by the caller
            self.samples.append((time.perf_counter() - self.t0, st.get("VmRSS", 0), st.get("RssAnon", 0)))
            nxt += self.interval
            delay = nxt - time.perf_counter()
            if delay > 0:
                self._halt.wait(delay)
            else:
                nxt = time.perf_counter()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak(self) -> tuple[float, int]:
        """(time, VmRSS KiB) of the highest sample."""
        if not self.samples:
            return 0.0, 0
        t, rss, _ = max(self.samples, key=lambda s: s[1])
        return t, rss


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


@dataclass
class Result:
    size_bytes: int
    frames: int
    idle_cold_kib: int
    idle_kib: int  # baseline: after the warm-up instance
    peak_sampled_kib: int
    peak_sampled_at_s: float
    vmhwm_kib: int
    vmhwm_reset: bool
    peak_kib: int
    growth_kib: int
    growth_vs_cold_kib: int
    after_kib: int
    samples: int
    elapsed_s: float
    mb_per_s: float
    bytes_match: bool
    ok: bool
    errors: list[str]


def mb(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Peak RSS of dicom-node while receiving one large multi-frame instance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size-mb", type=int, default=1024, help="Pixel Data size of the instance, MiB")
    p.add_argument(
        "--limit-mb",
        type=float,
        default=100.0,
        help="fail if the node's RSS grows by more than this (MiB) during the transfer",
    )
    p.add_argument("--interval", type=float, default=0.02, help="RSS sampling interval, seconds")
    p.add_argument("--workdir", type=Path, help="where the instance and the node's data go [a new temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the work dir (two copies of the instance!)")
    p.add_argument("--json", metavar="OUT", type=Path, help="write the results and all samples as JSON here")
    p.add_argument("--send-timeout", type=float, default=1800.0, help="max seconds for the transfer")
    args = p.parse_args(argv)
    if args.size_mb < 1 or args.interval <= 0:
        p.error("--size-mb must be >= 1 and --interval > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    if missing_binaries([STORESCU, ECHOSCU]):
        return 2
    workdir, own_workdir = make_workdir(args.workdir, "bench-memory-")
    machine = machine_info(workdir)
    versions = tool_versions()
    errors: list[str] = []
    result: Result | None = None
    samples: list[tuple[float, int, int]] = []

    try:
        # --- data
        big = workdir / "data" / "large.dcm"
        big.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sop_uid, frames = write_large_instance(big, args.size_mb)
        size = big.stat().st_size
        log(f"wrote {big.name}: {frames} frames {ROWS}x{COLS}, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
        from pydicom import dcmread

        chk = dcmread(big, stop_before_pixels=True)
        assert int(chk.NumberOfFrames) == frames and chk.SOPInstanceUID == sop_uid
        t0 = time.perf_counter()
        src_digest, src_len = dataset_digest(big)
        log(f"source data set: {src_len} bytes, digest {src_digest[:16]}... ({time.perf_counter() - t0:.1f}s)")
        warmup = generate_series(
            SeriesSpec("warmup", "warm-up", 128, 128, 1), workdir / "data" / "warmup", seed=7, patient_id="WARMUP01"
        )

        with ProcessGroup() as pg:
            recv = NodeReceiver(pg)
            try:
                recv.start(workdir / "node")
            except ReceiverUnavailable as exc:
                log(f"node did not start: {exc}")
                return 1
            assert recv.proc is not None
            pid = recv.proc.pid
            time.sleep(1.0)  # let start-up work (logging, threads) settle
            idle_cold = proc_status(pid)["VmRSS"]
            w = send_with_storescu(pg, warmup, recv.port, recv.ae_title, 1, workdir / "send-warmup")
            if not w.ok:
                log(f"warm-up failed: {'; '.join(w.errors)}")
                return 1
            time.sleep(0.5)
            idle = proc_status(pid)["VmRSS"]
            hwm_reset = reset_peak(pid)
            log(
                f"node pid {pid}: idle RSS {mb(idle_cold)}, after warm-up {mb(idle)}; "
                f"VmHWM reset: {'yes' if hwm_reset else 'NO (VmHWM includes start-up)'}"
            )

            sampler = Sampler(pid, args.interval)
            sampler.start()
            log(f"sending {size / 1e6:.0f} MB with storescu ...")
            res = send_with_storescu(
                pg, [big], recv.port, recv.ae_title, 1, workdir / "send", timeout=args.send_timeout
            )
            time.sleep(0.3)  # the tail of the store (fsync, index) is in the samples too
            sampler.stop()
            samples = sampler.samples
            if not recv.alive():
                errors.append("the node died during the transfer")
                status: dict[str, int] = {}
            else:
                status = proc_status(pid)
            errors += res.errors
            log(f"transfer: {res.elapsed_s:.2f}s, {size / res.elapsed_s / 1e6:.1f} MB/s ({len(samples)} RSS samples)")

            # --- verification: the index points at a file whose data set is the source's
            db = recv.data_dir / "index.sqlite"
            stored: Path | None = None
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
                try:
                    row = con.execute(
                        "SELECT file_path, file_size FROM instance WHERE sop_instance_uid = ?", (sop_uid,)
                    ).fetchone()
                finally:
                    con.close()
            except sqlite3.Error as exc:
                row = None
                errors.append(f"cannot read the index: {exc}")
            if row is None:
                errors.append(f"the index has no row for {sop_uid}")
            else:
                stored = recv.data_dir / row[0]
                if not stored.is_file():
                    errors.append(f"indexed file {row[0]} does not exist")
                    stored = None
                elif stored.stat().st_size != row[1]:
                    errors.append(f"indexed size {row[1]} != file size {stored.stat().st_size}")
            bytes_match = False
            if stored is not None:
                t0 = time.perf_counter()
                dst_digest, dst_len = dataset_digest(stored)
                bytes_match = (dst_digest, dst_len) == (src_digest, src_len)
                log(
                    f"stored data set: {dst_len} bytes, digest {dst_digest[:16]}... "
                    f"({time.perf_counter() - t0:.1f}s): {'IDENTICAL' if bytes_match else 'DIFFERENT'}"
                )
                if not bytes_match:
                    errors.append(f"stored data set differs from the source ({dst_len} vs {src_len} bytes)")
            if errors:
                log(f"node log tail:\n{tail(recv.log_path or Path('/nonexistent'), 20)}")
            recv.stop()

        peak_t, peak_sampled = sampler.peak()
        hwm = status.get("VmHWM", 0)
        peak = max(peak_sampled, hwm if hwm_reset else 0)
        growth = peak - idle
        result = Result(
            size_bytes=size,
            frames=frames,
            idle_cold_kib=idle_cold,
            idle_kib=idle,
            peak_sampled_kib=peak_sampled,
            peak_sampled_at_s=round(peak_t, 3),
            vmhwm_kib=hwm,
            vmhwm_reset=hwm_reset,
            peak_kib=peak,
            growth_kib=growth,
            growth_vs_cold_kib=peak - idle_cold,
            after_kib=status.get("VmRSS", 0),
            samples=len(samples),
            elapsed_s=round(res.elapsed_s, 3),
            mb_per_s=round(size / res.elapsed_s / 1e6, 1),
            bytes_match=bytes_match,
            ok=False,
            errors=errors,
        )
        if growth / 1024 > args.limit_mb:
            errors.append(f"RSS grew by {mb(growth)}, above the {args.limit_mb:.0f} MiB limit")
        result.ok = not errors
    except KeyboardInterrupt:
        log("interrupted: all child processes stopped")
        return 130
    finally:
        if not args.keep:
            rmtree_quiet(workdir if own_workdir else workdir / "data")
            if not own_workdir:
                rmtree_quiet(workdir / "node")
        else:
            log(f"work dir kept: {workdir}")

    r = result
    print()
    print(
        f"Machine:  {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, "
        f"Linux {machine['kernel']}, storage {machine['workdir_fs']}, "
        f"load avg at start {machine['loadavg_1min_at_start']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"Instance: Multi-frame Grayscale Word SC, {r.frames} frames {ROWS}x{COLS} 16-bit, "
        f"explicit VR LE, {r.size_bytes / 1e6:.1f} MB ({r.size_bytes / MIB:.1f} MiB); "
        f"sender DCMTK storescu on loopback, TCP_NODELAY=1"
    )
    print()
    print(f"  idle RSS (after start)        {mb(r.idle_cold_kib):>12}")
    print(f"  idle RSS (after warm-up) [B]  {mb(r.idle_kib):>12}")
    print(
        f"  peak RSS sampled every {args.interval * 1000:.0f} ms {mb(r.peak_sampled_kib):>12}"
        f"  (at {r.peak_sampled_at_s:.2f}s, {r.samples} samples)"
    )
    print(
        f"  VmHWM after transfer          {mb(r.vmhwm_kib):>12}"
        f"  ({'reset before the transfer' if r.vmhwm_reset else 'NOT reset: includes start-up'})"
    )
    print(f"  RSS after transfer            {mb(r.after_kib):>12}")
    print(f"  peak [P]                      {mb(r.peak_kib):>12}")
    print(f"  growth P - B                  {mb(r.growth_kib):>12}  (limit {args.limit_mb:.0f} MiB)")
    print(f"  growth vs idle after start    {mb(r.growth_vs_cold_kib):>12}")
    print(f"  transfer time                 {r.elapsed_s:>10.2f} s  ({r.mb_per_s:.1f} MB/s, storescu start to exit)")
    print(f"  stored data set == source     {'yes' if r.bytes_match else 'NO':>12}")
    print()
    if args.json:
        out = {
            "machine": machine,
            "versions": versions,
            "settings": vars(args) | {"json": str(args.json), "workdir": str(args.workdir) if args.workdir else None},
            "result": asdict(r),
            "samples_t_s_vmrss_kib_rssanon_kib": samples,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        log(f"wrote {args.json}")
    if r.ok:
        print(f"PASS: growth {mb(r.growth_kib)} <= {args.limit_mb:.0f} MiB, bytes identical")
        return 0
    print("FAIL: " + "; ".join(r.errors))
    return 1


if __name__ == "__main__":
    sys.exit(main())
